"""Write ``method/<name>.yaml`` and ``tuning/<preset>/<name>.yaml`` from the methods' Config dataclasses.

    python -m bench.conf.generate            # rewrite the generated files
    python -m bench.conf.generate --check    # exit 1 if any is out of date (tests/test_run_cli.py runs this)

The dataclass is the single source of truth: every field with its paper default and its one-line docstring as
the YAML comment; each entry of ``Config.presets`` (e.g. "toy", from toy-recipes.md) becomes
``tuning/<preset>/<method>.yaml``, which Hydra merges over the method file when ``recipe=<preset>``.
``tuning/smoke/`` (tiny batch sizes for CI), ``tuning/paper_nfe/`` (the papers' run-length caps off, for the
real-model grids) and ``tuning/standin/`` (CPU stand-ins of those grids) are written by hand and never touched here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

CONF = Path(__file__).resolve().parent
HAND_WRITTEN_PRESETS = ("smoke", "paper_nfe", "standin")


def _scalar(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text.removesuffix("\n...")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _field_docs(config_cls: type) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Field docstrings and the section comments ("# --- sampling ---") found above each field, of the class and of
    the dataclasses it derives from (a subclass's own docstring of a field wins)."""
    docs: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    for cls in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(cls) and cls.__dict__.get("__dataclass_fields__") is not None:
            own_docs, own_sections = _own_field_docs(cls)
            docs.update(own_docs)
            sections.update(own_sections)
    return docs, sections


def _own_field_docs(config_cls: type) -> tuple[dict[str, str], dict[str, list[str]]]:
    source = textwrap.dedent(inspect.getsource(config_cls))
    lines = source.splitlines()
    tree = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    body = tree.body
    prev_end = 0
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            between = lines[prev_end:node.lineno - 1]
            sections[name] = [ln.strip() for ln in between if ln.strip().startswith("# ---")]
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[name] = _one_line(nxt.value.value)
        prev_end = getattr(node, "end_lineno", prev_end) or prev_end
    return docs, sections


def method_yaml(name: str) -> str:
    import methods

    cls = methods.config_class(name)
    module = Path(inspect.getsourcefile(cls)).resolve()
    rel = module.relative_to(CONF.parents[1]) if module.is_relative_to(CONF.parents[1]) else module
    docs, sections = _field_docs(cls)
    out = [f"# python -m bench.run method={name}"]
    if cls.__doc__:
        out += [f"# {line}" if line else "#" for line in inspect.cleandoc(cls.__doc__).splitlines()]
    out += [f"# GENERATED from {rel} (Config) by `python -m bench.conf.generate`: edit the dataclass, then regenerate.",
            f"# Recipe overrides merged on top: tuning/<recipe>/{name}.yaml (recipe=toy by default).",
            f"name: {name}          # methods registry name"]
    fields = dataclasses.fields(cls)
    if not fields:
        out.append("# (no fields)")
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out += sections.get(f.name, [])
        comment = docs.get(f.name, "")
        out.append(f"{f.name}: {_scalar(default)}" + (f"   # {comment}" if comment else ""))
    space = cls.search_space()  # every method's Config has one (methods/base.py's protocol)
    if space:
        out += ["# The Optuna search space of `python -m bench.sweep method=<this>` (Config.search_space()). To tune other",
                "# ranges, uncomment this block (it then wins over the dataclass) or pass sweep.space={...}:",
                "# search_space:"]
        out += [f"#   {key}: {_scalar(list(spec))}" for key, spec in space.items()]
    return "\n".join(out) + "\n"


def tuning_yaml(name: str, preset: str, values: dict[str, Any]) -> str:
    import methods

    cls = methods.config_class(name)
    docs, _ = _field_docs(cls)
    out = [f"# python -m bench.run method={name} recipe={preset}",
           f"# GENERATED from {cls.__module__}.{cls.__qualname__}.presets[{preset!r}] by `python -m bench.conf.generate`.",
           f"# Merged over method/{name}.yaml when recipe={preset}; command-line overrides still win."]
    if not values:
        out.append("{}")
    for key, value in values.items():
        comment = docs.get(key, "")
        out.append(f"{key}: {_scalar(value)}" + (f"   # {comment}" if comment else ""))
    return "\n".join(out) + "\n"


def expected_files() -> dict[Path, str]:
    import methods

    files: dict[Path, str] = {}
    for name in methods.names():
        try:
            methods.config_class(name)
        except ImportError:  # a method whose module is not written yet
            continue
        files[CONF / "method" / f"{name}.yaml"] = method_yaml(name)
        for preset, values in methods.presets(name).items():
            if preset in HAND_WRITTEN_PRESETS:
                continue
            files[CONF / "tuning" / preset / f"{name}.yaml"] = tuning_yaml(name, preset, dict(values))
            recipe = CONF / "recipe" / f"{preset}.yaml"
            if recipe not in files and not recipe.exists():
                files[recipe] = (f"# python -m bench.run recipe={preset}\n# GENERATED by `python -m bench.conf.generate` "
                                 f"for a preset first seen in methods.{name}.Config.presets: methods with a\n"
                                 f"# tuning/{preset}/<method>.yaml use it, the others keep their paper defaults.\n"
                                 f"name: {preset}\n")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conf.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date files")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for path in stale:
        print(("out of date: " if args.check else "wrote ") + str(path.relative_to(CONF.parents[1])))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
