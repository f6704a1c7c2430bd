"""Silence the known third-party notices that every bitflux command would otherwise print.

Each filter matches one exact message at its source (a logger or a warning category + message
regex), so any other warning from the same library still shows. Installed by the CLI and
`make demo` before they import diffusers/transformers, and by `import bitflux` for library users.
"""

from __future__ import annotations

import logging
import re
import warnings

# transformers (>= 5) logs this once per class when torchvision is absent and it falls back to
# the PIL image processor; diffusers' pipelines import CLIP/Siglip processors, and bitflux never
# uses them for images (toy text encoders only), so the notice is noise here.
_TRANSFORMERS_LOGGER = "transformers.utils.import_utils"
_TORCHVISION_FALLBACK = re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`")

# diffusers' ModelMixin.to(dtype) warns about fp32 modules even when the list of them is empty.
_DIFFUSERS_LOGGER = "diffusers.models.modeling_utils"
_EMPTY_FP32_MODULES = re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")

# torch's own torch/utils/mkldnn.py uses the deprecated `torch.jit.script_method` when torch's
# inductor is imported (diffusers imports it); only visible with -W default or under pytest.
_WARNINGS = (
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
)


class _DropMessages(logging.Filter):
    """A logging filter that drops records whose message matches `pattern`."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Install the filters (idempotent). Call before importing diffusers or transformers."""
    logger = logging.getLogger(_TRANSFORMERS_LOGGER)
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(_TORCHVISION_FALLBACK))
    diffusers_logger = logging.getLogger(_DIFFUSERS_LOGGER)
    if not any(isinstance(f, _DropMessages) for f in diffusers_logger.filters):
        diffusers_logger.addFilter(_DropMessages(_EMPTY_FP32_MODULES))
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
