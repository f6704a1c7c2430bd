"""bitflux._quiet drops exactly the known third-party notices and nothing else."""

import logging
import warnings

from bitflux import _quiet


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _logged(msg: str) -> bool:
    """Log `msg` on transformers' import_utils logger; True if a handler on that logger received it.

    The handler sits on the logger itself: transformers' root logger does not propagate to ours."""
    logger = logging.getLogger(_quiet._TRANSFORMERS_LOGGER)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        logger.warning(msg)
    finally:
        logger.removeHandler(handler)
    return msg in handler.messages


def test_torchvision_fallback_notice_is_dropped_other_warnings_kept():
    _quiet.install()
    _quiet.install()  # idempotent: one filter
    logger = logging.getLogger(_quiet._TRANSFORMERS_LOGGER)
    assert sum(isinstance(f, _quiet._DropMessages) for f in logger.filters) == 1
    notice = (
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
        "for backward compatibility."
    )
    assert not _logged(notice)
    assert _logged("`CLIPImageProcessor` requires torchvision >= 0.27 for LANCZOS")  # a different message
    assert _logged("something else went wrong")


def test_torch_jit_deprecation_is_ignored_other_deprecations_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet.install()
        warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`", DeprecationWarning)
        warnings.warn("`torch.jit.trace` is deprecated", DeprecationWarning)
    assert [str(w.message) for w in seen] == ["`torch.jit.trace` is deprecated"]
