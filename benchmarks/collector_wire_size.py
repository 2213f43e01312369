"""Wire size of a 32-layer x 32-head message with the default statistics.

Usage:
    python benchmarks/collector_wire_size.py [--save]

Measured on attention a model computed (a 32-layer, 32-head random-weight Llama, 600-token
prompt) and, as the worst case, on incompressible uniform noise in every statistic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from collector_publisher_outage import synthetic_messages
    from transformers import LlamaConfig, LlamaForCausalLM

    from collector import MemorySink, attach

    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=8, max_position_embeddings=1024, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    sink = MemorySink()
    with torch.no_grad(), attach(model, sink=sink, sample_rate=1.0, min_context_tokens=0):
        model(torch.randint(0, 64, (1, 600)))
    (message,) = sink.messages
    noise = synthetic_messages(1)[0]
    result = {
        "message_bytes": len(message.to_bytes()),
        "header_json_bytes": len(message.header.model_dump_json(exclude_none=True)),
        "uniform_noise_message_bytes": len(noise.to_bytes()),
        "stats": list(message.header.stat_names),
    }
    return report("collector_wire_size", result, args.save)


if __name__ == "__main__":
    sys.exit(main())
