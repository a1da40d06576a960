"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

For one problem with n samples of which c pass, the probability that at least one of k samples drawn
without replacement passes:

    pass@k = 1 - C(n - c, k) / C(n, k)  =  1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form never builds the huge binomials (C(200, 100) ~ 9e58) and is what human-eval, the
bigcode harness and EvalPlus compute. The benchmark score is the mean over problems, reported only
for k no larger than the smallest number of samples of any problem.
"""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: n samples, c of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def aggregate(per_task: dict[str, tuple[int, int]], ks=(1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems, {task_id: (n, c)} -> {"pass@1": ..., ...}, for each k <= min n."""
    if not per_task:
        raise ValueError("no problems to aggregate")
    n_min = min(n for n, _ in per_task.values())
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in per_task.values()) / len(per_task)
            for k in sorted(set(ks)) if k <= n_min}
