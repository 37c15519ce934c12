#!/usr/bin/env python3
"""Regenerates fuzz/seeds/<target>/ from the shipped examples and the
`tests:` of sources.d/*.yaml (each `payload:` as compact JSON, each raw
`body:` as is). Seeds are committed; run this after changing either."""
import hashlib
import json
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGETS = ("decode", "mapping", "verify")


class Loader(yaml.SafeLoader):
    """YAML as serde_yaml_ng reads it: timestamps stay strings."""


Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def seeds():
    for path in sorted((ROOT / "examples" / "payloads").iterdir()):
        if path.suffix in (".json", ".txt"):
            yield path.read_bytes().strip()
    for path in sorted((ROOT / "sources.d").glob("*.y*ml")):
        doc = yaml.load(path.read_text(), Loader=Loader) or {}
        for test in doc.get("tests") or []:
            if "payload" in test:
                yield json.dumps(test["payload"], separators=(",", ":"), ensure_ascii=False).encode()
            if "body" in test:
                yield str(test["body"]).encode()


def main():
    names = set()
    for data in seeds():
        name = hashlib.sha1(data).hexdigest()
        names.add(name)
        for target in TARGETS:
            d = ROOT / "fuzz" / "seeds" / target
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
    print(f"{len(names)} seeds written to fuzz/seeds/{{{','.join(TARGETS)}}}", file=sys.stderr)


if __name__ == "__main__":
    main()
