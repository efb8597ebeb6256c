"""The compute dtype of the applications (demo, finetune, train, benchmarks/bench_llm.py), and why.

bfloat16 halves the base's memory traffic, but only a CPU with native bfloat16 arithmetic
(AVX512-BF16; :func:`minidora.ops.cpu_native_bf16`) turns that into speed. Elsewhere every
bfloat16 value is widened to float32 in software (one fine-tuning step of SmolLM2-135M was
reported at about 320 s in bfloat16 and 50 s in float32 on a busy AVX2-only CPU). So a model
that prefers bfloat16 gets it by default only where it is native, float32 elsewhere, and a dtype
asked for explicitly always wins. Every choice comes with one line for the run's output, saying
which and why.
"""

from __future__ import annotations

from minidora import ops

__all__ = ["DTYPES", "compute_dtype", "bf16_note", "cpu_level"]

DTYPES = ("float32", "bfloat16")


def cpu_level() -> str:
    """The CPU kernel level in words, for the lines below (``"CPU kernels avx2"``)."""
    if ops.extension_available():
        return f"CPU kernels {ops.cpu_isa()}"
    return "torch's CPU detection"


def bf16_note() -> str:
    """Empty where this thread's CPU kernels have native bfloat16, else a phrase saying that
    bfloat16 is emulated here."""
    if ops.cpu_native_bf16():
        return ""
    return (f"this CPU has no native bfloat16 arithmetic ({cpu_level()}), so bfloat16 is "
            "emulated, several times slower than float32")


def compute_dtype(requested: str | None, preferred: str = "bfloat16",
                  option: str = "--compute-dtype") -> tuple[str, str]:
    """The compute dtype of a run and one line saying which and why.

    Args:
        requested: the dtype asked for (``"float32"``, ``"bfloat16"``, ...), None for the
            default.
        preferred: the default on a CPU with native bfloat16: ``"bfloat16"``, or ``"float32"``
            for a model that computes in float32 on every CPU.
        option: the command-line option that asks for a dtype, named in the line.

    Returns:
        (dtype name, line), e.g. ``("float32", "compute dtype float32 (the default here: this
        CPU has no native bfloat16 arithmetic (CPU kernels avx2), ...")``.

    Raises:
        ValueError: ``preferred`` is not one of :data:`DTYPES`.
    """
    if preferred not in DTYPES:
        raise ValueError(f"preferred must be one of {DTYPES}, got {preferred!r}")
    note = bf16_note()
    if requested is not None:
        line = f"compute dtype {requested} (asked for with {option})"
        return requested, line + (f"; {note}" if requested == "bfloat16" and note else "")
    if preferred == "float32":
        return "float32", (f"compute dtype float32 (the default; {option} bfloat16 asks for "
                           f"bfloat16, {'emulated' if note else 'native'} on this CPU)")
    if note:
        return "float32", (f"compute dtype float32 (the default here: {note}; {option} "
                           "bfloat16 asks for it anyway)")
    return "bfloat16", (f"compute dtype bfloat16 (the default where the CPU has native bfloat16 "
                        f"arithmetic, as here: {cpu_level()}; {option} float32 asks for float32)")
