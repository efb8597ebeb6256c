"""minidora.testing: a conformance kit for your own LoRA, DoRA and NF4, and the golden vectors.

If you wrote a LoRA or DoRA layer or an NF4 quantizer, these checks run it on the golden values
of the libraries everyone compares with (bitsandbytes 0.50.2 for NF4, PEFT 0.21.2 for the
adapters; shipped in :mod:`minidora.testing.golden`) and on fresh random cases, against
minidora's reference, and report where the first difference is and which classic mistake it
looks like::

    from minidora.testing import check_nf4, check_lora, check_dora

    print(check_nf4(my_quantize, my_dequantize))   # bit-exact with bitsandbytes?
    check_dora(my_dora_factory).assert_ok()         # in a test suite

From the command line: ``python -m minidora verify my_module:my_quantize --kind nf4``.
"""

from . import golden
from ._util import MAX_SEED, describe_error
from .adapter_check import check_dora, check_lora
from .nf4_check import check_nf4
from .report import Report, Row

__all__ = ["check_nf4", "check_lora", "check_dora", "Report", "Row", "golden", "MAX_SEED",
           "describe_error"]
