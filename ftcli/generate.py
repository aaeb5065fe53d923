"""`ftcli generate` and `ftcli chat`: talk to a run through its saved chat template."""
# CONTRACT (owned by the eval helper; replace the stubs, keep the signatures):

from __future__ import annotations


def run_generate(run, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 merged: bool, stream=None) -> list[dict]:
    raise NotImplementedError


def run_chat(run, *, max_new_tokens: int, temperature: float, top_p: float, seed: int, merged: bool, console) -> None:
    raise NotImplementedError
