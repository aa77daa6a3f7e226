"""Evaluation of FFN skipping against the paper's tables (FFN-SkipLLM, Jaiswal et al. 2024).

- `ffnskip eval qa`: factoid QA accuracy per method and target skip ratio (Tables 2-3 shape);
- `ffnskip eval agreement`: agreement with dense and token collapse on open prompts;
- `ffnskip eval warmup`: quality against the number of warm-up tokens (Figure 5 shape);
- `ffnskip eval report`: docs/RESULTS.md and its plots from the commands' JSON outputs.

Every generation goes through the skip engine in fixed chunks (deterministic batch
composition) and is cached per item in a JSONL state file (`--out`), so a rerun
resumes where it stopped and a finished run is answered from the cache.
"""

from ffnskip.evaluation.data import Item, load_prompt_items, load_qa_items
from ffnskip.evaluation.methods import METHODS, Setting

__all__ = ["Item", "load_prompt_items", "load_qa_items", "METHODS", "Setting"]
