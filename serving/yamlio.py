"""The one YAML loader of files a user writes (configs, conditions, policies): ``yaml.safe_load`` that refuses a
key written twice. Serving side (policies are read by the server), so training imports it from here."""

from __future__ import annotations

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a mapping repeating a key is an error (``yaml.YAMLError``) naming
    the key and both lines; PyYAML would keep the last one silently (two ``decision:`` sections: the first is lost)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding keys is what merges are for
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        problem=f"key {key!r} appears twice (lines {first_line[key]} and {line}); the second would "
                        "silently replace the first: write it once")
                first_line[key] = line
            except TypeError:  # an unhashable key: the base class refuses it
                continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (:class:`UniqueKeyLoader`); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=UniqueKeyLoader)
