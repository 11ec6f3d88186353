"""The generated method YAMLs: the commented search_space block is the method's Config.search_space()."""

import json

import pytest
import yaml

import methods
from bench.conf import generate


def _commented_block(text: str) -> dict:
    lines = text.splitlines()
    start = lines.index("# search_space:")
    block = [line[2:] for line in lines[start:] if line.startswith("# ")]
    return yaml.safe_load("\n".join(block))["search_space"]


@pytest.mark.parametrize("name", [n for n in methods.names() if methods.config_class(n).search_space()])
def test_uncommented_search_space_block_is_the_dataclass_space(name):
    block = _commented_block(generate.method_yaml(name))
    space = json.loads(json.dumps(methods.config_class(name).search_space()))  # tuples -> lists
    assert block == space
    # YAML 1.1 reads "1e-06" as a string: every bound of a float range must come back as a number.
    for spec in block.values():
        if spec[0] in ("float", "log_float"):
            assert all(isinstance(v, float) for v in spec[1:3]), spec
