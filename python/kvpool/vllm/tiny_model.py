"""A small Llama model and its tokenizer, created locally (random weights, a byte-level BPE
trained on generated text): what the connector's tests, the main job and bench/ttft.py serve.

Nothing is downloaded. The same arguments give the same files, so two processes (or two
machines) that create the model get identical weights, tokens and therefore KV bytes::

    python -m kvpool.vllm.tiny_model /tmp/tiny-llama            # the test model (~1 MB)
    python -m kvpool.vllm.tiny_model /tmp/bench-llama --preset bench
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["PRESETS", "ModelSpec", "make_model", "sample_text"]


@dataclass(frozen=True)
class ModelSpec:
    """The shape of the generated model. vLLM's CPU attention needs head_dim in
    {32, 64, 80, 96, 112, 128, ...}; hidden = heads * head_dim."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab: int = 1536
    max_positions: int = 16384
    dtype: str = "float32"
    #: Larger than Llama's 0.02 so that attention is far from uniform: the output then depends
    #: on the KV of every block, which the connector's negative-control test relies on.
    init_std: float = 0.2
    seed: int = 0


PRESETS = {
    "tiny": ModelSpec(),
    # bench/ttft.py: prefill of 8k tokens dominates a request (~8 s on one core), as with a real
    # model; 4 KiB of KV per token. float32: vLLM's CPU bfloat16 path is far slower without
    # AVX-512 BF16 (run it with --dtype float32: vLLM's "auto" means bfloat16 on CPU).
    "bench": ModelSpec(
        hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, dtype="float32", init_std=0.2
    ),
}

_SYLLABLES = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "sh", "ng", "qu"]


def sample_text(words: int, seed: int) -> str:
    """Pseudo-English text (deterministic for a seed): the BPE's corpus and the prompts."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    out = []
    for i in range(words):
        w = vocab[min(int(rng.paretovariate(1.1)) - 1, len(vocab) - 1)]
        out.append(w + ("." if i % 13 == 12 else "," if i % 7 == 6 else ""))
    return " ".join(out)


def make_model(path: str | Path, spec: ModelSpec | str = "tiny") -> Path:
    """Creates the model directory at ``path`` (config, weights, tokenizer) unless one made with
    the same spec is already there; returns the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = PRESETS[spec] if isinstance(spec, str) else spec
    path = Path(path)
    marker = path / "kvpool_model_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return path
    path.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab - 2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sample_text(2000, seed) for seed in range(50)], trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_std,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))  # type: ignore[no-untyped-call]
    model.save_pretrained(path)
    marker.write_text(json.dumps(asdict(spec)))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = p.parse_args()
    print(make_model(args.path, args.preset))


if __name__ == "__main__":
    main()
