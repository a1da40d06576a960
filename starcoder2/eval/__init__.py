"""Evaluation: benchmark tasks, generation through the Engine, sandboxed execution of the generated
programs, pass@k, and static checks on the generated code."""
