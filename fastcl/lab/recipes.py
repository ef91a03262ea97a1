"""Recipe cards: every published config's recipe-defining values with their sources (docs/recipes.yaml).

    python -m fastcl.lab.recipes            # rewrite docs/RECIPES.md from docs/recipes.yaml
    python -m fastcl.lab.recipes --check    # exit 1 when a config differs from its card or RECIPES.md is stale

docs/recipes.yaml holds `sources` (id -> url + what) and `cards` (config name -> {summary, notes, values}), where
`values` maps a dotted config key to {value, source}. A source cites one or more `[id]`s with the place inside
(section, key, line) or starts with "our choice:" followed by the reason. `data.aug.views.N` cards a whole view
(every ViewSpec field). tests/test_recipes.py fails when a shipped config (configs/exp/*.yaml) has no card, when
its resolved value (`fastcl.config.load_config`) differs from its card, or when a card leaves out a key that
defines the recipe (`required_keys`).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
from typing import Any

import yaml
from omegaconf import OmegaConf
from fastcl.lab import REPO

CARDS_PATH = os.path.join(REPO, "docs", "recipes.yaml")
MD_PATH = os.path.join(REPO, "docs", "RECIPES.md")
EXP_DIR = os.path.join(REPO, "configs", "exp")

MODEL_KEYS = ["arch", "cifar_stem", "width", "proj_hidden", "proj_dim", "proj_layers", "proj_bn", "proj_out_bn",
              "pred_hidden", "sync_bn", "shuffle_bn", "bn_splits", "bn_split_scope"]
OPTIM_KEYS = ["name", "batch_size", "lr", "base_batch", "momentum", "weight_decay", "warmup_epochs", "min_lr",
              "clip_grad"]
QUEUE_METHOD_KEYS = ["tau", "queue_size", "batch_negatives", "symmetric", "ema", "ema_end"]
OUR_CHOICE = "our choice:"


def exp_configs() -> dict[str, str]:
    """{card name: path} of every published config."""
    return {os.path.basename(p)[:-5]: p for p in sorted(glob.glob(os.path.join(EXP_DIR, "*.yaml")))}


def load_cards(path: str = CARDS_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def required_keys(cfg) -> list[str]:
    """The dotted keys that define a config's recipe: model, every view, optimiser, epochs, the method's shared
    keys and its own section (every field of its Config dataclass)."""
    from fastcl.methods import METHODS

    name = cfg.method.name
    cls = METHODS[name]
    inbatch = cls.inbatch_only or (cls.follows_base and cfg.method.base == "simclr")  # no queue, no teacher
    keys = [f"model.{k}" for k in MODEL_KEYS]
    keys += ["data.aug.mean", "data.aug.std"] + [f"data.aug.views.{i}" for i in range(len(cfg.data.aug.views))]
    keys += ["method.name"] + (["method.base"] if cls.follows_base else [])  # add-ons on a base: its layout
    keys += ["method.tau", "method.queue_size"] if inbatch else [f"method.{k}" for k in QUEUE_METHOD_KEYS]
    if cls.Config is not None:
        keys += [f"method.{cls.section}.{k}" for k in cfg.method[cls.section]]
    keys += [f"optim.{k}" for k in OPTIM_KEYS] + (["optim.lars_eta"] if cfg.optim.name == "lars" else [])
    keys += ["trainer.epochs", "trainer.precision"]
    return keys


def resolved(cfg, key: str) -> Any:
    """A config value as plain YAML data (lists, dicts, scalars)."""
    node = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def same(a: Any, b: Any) -> bool:
    """Value equality for card checks: numbers by value (1 == 1.0, relative 1e-9), lists/dicts element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def source_problem(source: Any, sources: dict) -> str | None:
    """None if `source` cites a known [id] or states "our choice: <reason>"; else what is wrong."""
    if not isinstance(source, str) or not source.strip():
        return "no source"
    s = source.strip()
    if s.lower().startswith(OUR_CHOICE):
        return None if len(s) - len(OUR_CHOICE) >= 10 else "'our choice' without a reason"
    ids = re.findall(r"\[([a-z][a-z0-9-]*)\]", s)
    if not ids:
        return "cites no [source id] and is not marked 'our choice: <reason>'"
    unknown = [i for i in ids if i not in sources]
    return f"unknown source id(s) {unknown}" if unknown else None


def check_card(cfg, card: dict, sources: dict) -> list[str]:
    """Problems of one card against its resolved config (empty: the card matches)."""
    out = []
    values = card.get("values") or {}
    for key in required_keys(cfg):
        if key not in values:
            out.append(f"{key}: not on the card")
    for key, entry in values.items():
        if not isinstance(entry, dict) or "value" not in entry:
            out.append(f"{key}: card entry needs value and source")
            continue
        try:
            got = resolved(cfg, key)
        except Exception as e:  # noqa: BLE001 - a key the schema does not have
            out.append(f"{key}: not a config key ({e})")
            continue
        if not same(got, entry["value"]):
            out.append(f"{key}: config has {got!r}, card says {entry['value']!r}")
        problem = source_problem(entry.get("source"), sources)
        if problem:
            out.append(f"{key}: source {problem}")
    return out


def check_all(cards: dict | None = None) -> dict[str, list[str]]:
    """{config name: problems} over every published config and every card (only names with problems)."""
    from fastcl.config import load_config

    cards = cards if cards is not None else load_cards()
    sources, by_name = cards.get("sources") or {}, cards.get("cards") or {}
    out: dict[str, list[str]] = {}
    exp = exp_configs()
    for name, path in exp.items():
        if name not in by_name:
            out[name] = [f"configs/exp/{name}.yaml has no card in docs/recipes.yaml"]
            continue
        problems = check_card(load_config(path), by_name[name], sources)
        if problems:
            out[name] = problems
    for name in by_name:
        if name not in exp:
            out[name] = [f"card {name!r} has no config configs/exp/{name}.yaml"]
    return out


# ---------------------------------------------------------------------------------------------- markdown

def _fmt(v: Any) -> str:
    if isinstance(v, dict):  # a view: compact, every field
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _link(source: str, sources: dict) -> str:
    def sub(m):
        sid = m.group(1)
        return f"[{sid}]({sources[sid]['url']})" if sid in sources else m.group(0)
    return re.sub(r"\[([a-z][a-z0-9-]*)\]", sub, source).replace("|", "\\|")


def render(cards: dict) -> str:
    """docs/RECIPES.md from the cards (one table per config, then the source list)."""
    sources, by_name = cards.get("sources") or {}, cards.get("cards") or {}
    lines = [
        "# Recipe cards: every published config, value by value, with its source",
        "",
        "<!-- generated by `python -m fastcl.lab.recipes` from docs/recipes.yaml: edit the YAML, then re-run -->",
        "",
        "One table per config in `configs/exp/`. Each row is a value that defines the recipe, as the config resolves",
        "it (`fastcl.config.load_config`), and where it comes from: a source id (listed at the end, each a link to",
        "the file at a fixed commit or to the paper) with the place inside, or **our choice** with the reason.",
        "`tests/test_recipes.py` fails when a config's resolved value differs from its card, when a config has no",
        "card, or when a card leaves out a recipe key. Schedules are fastcl's (`fastcl/schedules.py`): linear lr",
        "warm-up over `optim.warmup_epochs`, then a per-step cosine to `optim.min_lr`·peak; the peak lr is",
        "`optim.lr × optim.batch_size / optim.base_batch` (`base_batch` 0: no scaling); the EMA momentum follows a",
        "cosine from `method.ema` to `method.ema_end`. A view reads: crop `size`/`scale`/`ratio`, flip `flip_p`,",
        "colour jitter with probability `jitter_p` (brightness/contrast/saturation/hue strengths), grayscale `gray_p`,",
        "Gaussian blur `blur_p` with sigma ~ U(`blur_sigma`) (std = sigma at every size, `pipelines/augment.py`),",
        "solarize `solarize_p` at `solarize_threshold`.",
        "",
    ]
    for name, card in by_name.items():
        lines += [f"## {name}", "", f"`configs/exp/{name}.yaml`: {card.get('summary', '').strip()}", ""]
        for note in card.get("notes") or []:
            lines.append(f"- {_link(note.strip(), sources)}")
        if card.get("notes"):
            lines.append("")
        lines += ["| key | value | source |", "|---|---|---|"]
        for key, entry in (card.get("values") or {}).items():
            lines.append(f"| `{key}` | {_fmt(entry['value'])} | {_link(str(entry['source']), sources)} |")
        lines.append("")
    lines += ["## Sources", "", "| id | what | link |", "|---|---|---|"]
    for sid, s in sources.items():
        lines.append(f"| {sid} | {s['what']} | <{s['url']}> |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="recipe cards: check configs against docs/recipes.yaml, "
                                             "write docs/RECIPES.md")
    ap.add_argument("--check", action="store_true", help="only check (exit 1 on a mismatch or a stale RECIPES.md)")
    a = ap.parse_args(argv)
    cards = load_cards()
    problems = check_all(cards)
    for name, ps in problems.items():
        for p in ps:
            print(f"{name}: {p}")
    md = render(cards)
    if a.check:
        stale = not os.path.isfile(MD_PATH) or open(MD_PATH).read() != md
        if stale:
            print("docs/RECIPES.md is not the rendering of docs/recipes.yaml: run python -m fastcl.lab.recipes")
        return 1 if problems or stale else 0
    with open(MD_PATH, "w") as f:
        f.write(md)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
