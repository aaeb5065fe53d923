"""Keep the libraries' chatter (progress bars, advisory warnings) off the terminal; ftcli reports what matters."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Idempotent; call before loading models or data in any command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # transformers prints "[INFO] Running in WANDB offline mode" on stdout when its integrations module is first
    # imported under WANDB_MODE=offline; stdout may carry --json, so that import happens here, onto stderr.
    if os.environ.get("WANDB_MODE") == "offline" and "transformers.integrations.integration_utils" not in sys.modules:
        with contextlib.suppress(Exception), contextlib.redirect_stdout(sys.stderr):
            import transformers.integrations.integration_utils  # noqa: F401
    # bitsandbytes cannot fetch an optional CPU kernel offline and says so at import; its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")  # merging handles tied weights itself
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
