"""Drop the import-time noise of dependencies this package does not use, and nothing else.

Loading a transformers model or NeMo AutoModel imports torchao, megatron_fsdp and friends, whose import prints lines
that read as breakage on a first run but only say an optional piece is absent:

* torchao: `Failed to load …/torchao/_C_mxfp8….so: Could not load this library` (its optional CUDA kernels);
* torch: `<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile…` (a
  deprecation aimed at torchao, logged from `torch.utils._pytree`);
* megatron_fsdp: `Transformer Engine and Apex are not installed. Falling back to local implementations…`.

Each filter matches one known message from one named logger or module; every other record of the same logger, and
every other warning, still shows. `install()` is idempotent and runs when the package is imported, so every entry
point (the `dspark` CLI, `torchrun -m nemo_automodel_dspark.train_dspark`, the benchmarks) starts clean.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, predicate on the formatted message): the records that filter drops.
_LOG_NOISE = (
    (
        "torchao",
        lambda msg: msg.startswith("Failed to load ") and "torchao" in msg and "Could not load this library" in msg,
    ),
    ("torch.utils._pytree", lambda msg: "is an Enum subclass and is now natively supported by torch.compile" in msg),
)
_WARNING_NOISE = (  # (message regex, module regex) for warnings.filterwarnings
    (r"Transformer Engine and Apex are not installed", r"megatron_fsdp\."),
)


class _KnownNoise(logging.Filter):
    def __init__(self, is_noise) -> None:
        super().__init__()
        self.is_noise = is_noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.is_noise(record.getMessage())


def install() -> None:
    """Add the filters (once per process)."""
    for name, is_noise in _LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(is_noise))
    for message, module in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
