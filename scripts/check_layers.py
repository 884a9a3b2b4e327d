#!/usr/bin/env python3
"""The module layers of src/: no import cycles, and no module reaching up.

lib.rs writes the layers down (its `//! Layers` list, lowest first); this
script reads that list, finds every `crate::` path in src/ (use lines and
inline paths, braces included), and fails when a module uses a module of a
higher layer, when two modules of one layer form a cycle, or when a module
is missing from the list. A folder module (src/cache/, src/usage/, ...)
counts as one node: its files are one concern.

    scripts/check_layers.py            # exit 1 on a violation
    scripts/check_layers.py --graph    # print the edges
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"


def strip_comments(text):
    # One pass, left to right, so that a quote inside a comment or a
    # comment marker inside a string is taken for what it is.
    token = re.compile(
        r'//[^\n]*|/\*.*?\*/|r(#*)".*?"\1|b?"(?:\\.|[^"\\])*"|b?\'(?:\\.|[^\'\\])\'',
        flags=re.S,
    )
    return token.sub(lambda m: '""' if m.group(0)[0] in 'rb"' else " ", text)


def top_module(path):
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def crate_paths(text):
    """First segments of every crate:: path, expanding brace groups."""
    out = set()
    for m in re.finditer(r"\bcrate::", text):
        i = m.end()
        if text[i:i + 1] == "{":
            depth, j, item = 0, i, ""
            items = []
            while j < len(text):
                c = text[j]
                if c == "{":
                    depth += 1
                    if depth == 1:
                        j += 1
                        continue
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        items.append(item)
                        break
                if depth == 1 and c == ",":
                    items.append(item)
                    item = ""
                else:
                    item += c
                j += 1
            for it in items:
                seg = re.match(r"\s*(\w+)", it)
                if seg:
                    out.add(seg.group(1))
        else:
            seg = re.match(r"(\w+)", text[i:])
            if seg:
                out.add(seg.group(1))
    return out


def declared_layers():
    lib = (SRC / "lib.rs").read_text()
    block = re.search(r"^//! Layers.*?\n((?://!.*\n)+)", lib, flags=re.M)
    if not block:
        sys.exit("check_layers: lib.rs has no '//! Layers' list")
    layers = []
    for line in block.group(1).splitlines():
        m = re.match(r"//!\s+\d+\.\s+[^:]*:\s*(.*)", line)
        if m:
            layers.append(re.findall(r"`(\w+)`", m.group(1)))
        elif layers and re.match(r"//!\s{3,}", line):
            layers[-1] += re.findall(r"`(\w+)`", line)
    return {name: n for n, names in enumerate(layers) for name in names}


def graph():
    modules = {top_module(p) for p in SRC.rglob("*.rs")} - {"lib"}
    edges = {m: set() for m in modules}
    for p in SRC.rglob("*.rs"):
        me = top_module(p)
        if me == "lib":
            continue
        for target in crate_paths(strip_comments(p.read_text())):
            if target in modules and target != me:
                edges[me].add(target)
    return modules, edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    modules, edges = graph()
    if "--graph" in sys.argv:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    layer = declared_layers()
    problems = []
    for m in sorted(modules - layer.keys()):
        problems.append(f"src/{m}: not in lib.rs's '//! Layers' list")
    for m in sorted(layer.keys() - modules):
        problems.append(f"lib.rs lists `{m}`, which is not a module")
    for m in sorted(edges):
        for t in sorted(edges[m]):
            if m in layer and t in layer and layer[t] > layer[m]:
                problems.append(f"{m} (layer {layer[m] + 1}) uses {t} (layer {layer[t] + 1}), a higher layer")
    for comp in cycles(edges):
        problems.append("import cycle: " + " <-> ".join(comp))
    for p in problems:
        print(f"check_layers: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_layers: {len(modules)} modules, {sum(map(len, edges.values()))} edges, no cycle, no upward use")


if __name__ == "__main__":
    main()
