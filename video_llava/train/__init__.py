"""The training stage: examples with answer-only labels, objectives (DPO), the Ray Train run scaffolding, and
growing a checkpoint's LLM."""
