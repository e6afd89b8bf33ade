"""Write SmolLM2-135M-Instruct with a chat template that renders tools into a model folder.

The bundled SmolLM2-135M-Instruct's own template ignores `tools` (rft refuses tool lines for it,
naming the model). This folder holds the same weights and tokenizer with `chat_template.jinja`
beside this script: the functions in a system turn inside <tools></tools>, calls as Hermes
<tool_call> blocks, tool results as <tool_response> turns. Train it by its path.

    python examples/tool_calling/prepare_model.py ./smollm2-tools
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.core.settings import Settings
from service.models import registry

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the model folder to write")
    out = parser.parse_args().out
    model, tokenizer = registry.load_fresh(registry.resolve(registry.SMOLLM2), Settings())  # data dir: RFT_DATA_DIR
    tokenizer.chat_template = (HERE / "chat_template.jinja").read_text()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out.resolve()}: train it with --model {out.resolve()}")


if __name__ == "__main__":
    main()
