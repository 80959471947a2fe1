"""The published configs (config.json as released, no weights) of the models the docs and the
model-family issues name, usable by name wherever a command takes --model:
`refmoe-sim predict --model deepseek-v3 ...`; `refmoe-sim models` lists them."""

from __future__ import annotations

import json
from pathlib import Path

from refmoe.config import ModelConfig

MODELS = Path(__file__).parent / "models"


def names() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.json"))


def resolve(spec: str) -> Path:
    """A config.json, a model directory, or a catalog name."""
    path = Path(spec)
    if path.exists():
        return path
    if (MODELS / f"{spec}.json").exists():
        return MODELS / f"{spec}.json"
    raise ValueError(
        f"--model {spec}: no such file or directory, and not a model this simulator ships "
        f"(refmoe-sim models: {', '.join(names())})"
    )


def load(spec: str) -> ModelConfig:
    return ModelConfig.from_file(resolve(spec))


def source(name: str) -> str:
    return json.loads((MODELS / f"{name}.json").read_text()).get("_source", "")


def check_context(cfg: ModelConfig, prompt_tokens: int, output_tokens: int, name: str) -> None:
    """Refuse a request the model cannot hold, as the engine does."""
    if prompt_tokens + output_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"{name}: a prompt of {prompt_tokens:,} tokens and {output_tokens:,} output tokens "
            f"exceed its context of {cfg.max_position_embeddings:,} tokens "
            f"(max_position_embeddings)"
        )
