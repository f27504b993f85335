"""Peak memory of what the ServerApp holds, with central evaluation at the server and at a facility.

    python bench/server_memory.py [--run-config recipes/laptop.toml] [--big-config 7b]

Each row runs in a fresh interpreter and reports its peak resident set (ru_maxrss), so rows do not
share allocations:
- imports: the ServerApp's modules imported, nothing built (the floor every row pays);
- eval.at = server: the base model loaded, LoRA attached, the initial adapter taken, one central
  evaluation of the test set (what `chemfl.server_app.app` does before its first round);
- eval.at = <facility>: the weightless skeleton (chemfl.llm.adapter_init), the initial adapter taken
  and saved in PEFT's format (the server's whole model-side work when a facility evaluates);
- a 7B config (Llama-2-7B's shape: 32 layers, 4096 wide, written here as config.json; no weights
  exist anywhere): the initial adapter built from the config alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROJECT = Path(__file__).resolve().parents[1]

# Llama-2-7B's architecture (its published config.json), for meta init only.
SEVEN_B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

ROW = """
import json, resource, sys, time
from chemfl.config import resolve
from chemfl.data_prep.cli import load_run_config
from chemfl.llm.model import LoraSpec, ModelSpec
import chemfl.server_app.app  # the ServerApp's imports, in every row
config = resolve({**load_run_config(sys.argv[2]), **json.loads(sys.argv[3])})
started = time.perf_counter()
mode = sys.argv[1]
if mode == "server":
    from chemfl.data_prep import store
    from chemfl.llm.evaluation import EvalSpec
    from chemfl.llm.lora import exchanged_state
    from chemfl.llm.session import get_session
    from chemfl.server_app.evaluation import LocalEvaluation
    session = get_session(config)
    initial = exchanged_state(session.model, session.lora_spec)
    records = store.read_records(__import__("pathlib").Path(str(config["data.path"])) / "test.parquet")
    LocalEvaluation(session, records, EvalSpec.from_config(config), config)(0, initial)
elif mode == "facility":
    import tempfile
    from chemfl.llm.adapter_init import adapter_skeleton
    from chemfl.llm.lora import exchanged_state, save_adapter
    skeleton = adapter_skeleton(ModelSpec.from_config(config), LoraSpec.from_config(config))
    initial = exchanged_state(skeleton, LoraSpec.from_config(config))
    save_adapter(skeleton, __import__("pathlib").Path(tempfile.mkdtemp()) / "adapter")
adapter_mb = sum(t.numel() * 4 for t in initial.values()) / 1e6 if mode != "imports" else 0.0
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - started, "adapter_mb": adapter_mb}))
"""


def measure(mode: str, recipe: str, overrides: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ROW, mode, recipe, json.dumps(overrides)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="recipes/laptop.toml")
    args = parser.parse_args()
    subprocess.run(
        [sys.executable, "-m", "chemfl.cli", "data", "build", "--run-config", args.run_config],
        cwd=PROJECT,
        check=True,
        capture_output=True,
    )
    rows = {
        "imports only": measure("imports", args.run_config, {}),
        "eval.at = server": measure("server", args.run_config, {}),
        "eval.at = aurora": measure("facility", args.run_config, {}),
    }
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(SEVEN_B))
        seven_b = {"model.name": folder, "model.gguf-file": "", "model.tiny": False}
        rows["7B config, eval.at = aurora"] = measure("facility", args.run_config, seven_b)
    table = Table(title=f"ServerApp peak memory ({args.run_config}; fresh interpreter per row)")
    for column in ("what the server holds", "peak RSS MB", "x eval.at = server", "seconds", "adapter MB"):
        table.add_column(column, justify="left" if column.startswith("what") else "right")
    reference = rows["eval.at = server"]["peak_mb"]
    for name, row in rows.items():
        table.add_row(
            name,
            f"{row['peak_mb']:.0f}",
            f"{row['peak_mb'] / reference:.2f}",
            f"{row['seconds']:.1f}",
            f"{row['adapter_mb']:.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
