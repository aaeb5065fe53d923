"""`ftcli merge`: full-precision base + adapter -> merged/, with a parity check against the adapter model."""
# CONTRACT (owned by the merge/export helper; replace the stubs, keep the signatures):

from __future__ import annotations


def merge_run(run, *, dtype: str | None = None, qlora_base: str | None = None, force: bool = False,
              console=None) -> dict:
    """Write run/merged atomically; record parity in run.json; QualityGateError (exit 6) when parity fails."""
    raise NotImplementedError
