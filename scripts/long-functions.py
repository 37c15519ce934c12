#!/usr/bin/env python3
"""Lists functions in src/ longer than a limit (default 80 lines), outside
#[cfg(test)] modules; exits 1 if any. A function may carry a reason on the
line before it: `// long: <why>`. Usage: python3 scripts/long-functions.py [LIMIT]"""
import re, sys, pathlib

limit = int(sys.argv[1]) if len(sys.argv) > 1 else 80
found = 0
for path in sorted(pathlib.Path(__file__).resolve().parent.parent.joinpath("src").rglob("*.rs")):
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"\s*#\[cfg\(test\)\]", line):
            break  # test modules sit at the end of a file
        m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(async\s+)?fn\s+(\w+)", line)
        if m:
            depth, j, opened = 0, i, False
            while j < len(lines):
                depth += lines[j].count("{") - lines[j].count("}")
                opened = opened or "{" in lines[j]
                if opened and depth <= 0:
                    break
                if not opened and lines[j].rstrip().endswith(";"):
                    break
                j += 1
            length = j - i + 1
            reason = i > 0 and lines[i - 1].strip().startswith("// long:")
            if length > limit and not reason:
                print(f"{path.relative_to(path.parents[1])}:{i + 1}: {m.group(4)} is {length} lines")
                found += 1
            i = j + 1 if opened else i + 1
            continue
        i += 1
sys.exit(1 if found else 0)
