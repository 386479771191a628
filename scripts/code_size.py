"""The project's longest functions and largest modules: ``python scripts/code_size.py [--top N] [--max-lines M]``.

Prints the ``--top`` longest functions (lines as Python's ``ast`` counts them: ``end_lineno - lineno + 1``,
decorators and docstring included) and every module over ``--max-lines`` lines, over fastsupmae/, kernels/,
pipelines/ and scripts/. The house rule it reports on: no function over 80 lines, no module over 600.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("fastsupmae", "kernels", "pipelines", "scripts")


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function and method in ``path``."""
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((child.end_lineno - child.lineno + 1, name))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(path.read_text()), "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--max-lines", type=int, default=600)
    args = ap.parse_args()
    files = sorted(p for d in FOLDERS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    funcs = [(n, f"{p.relative_to(ROOT)}:{name}") for p in files for n, name in functions(p)]
    print(f"the {args.top} longest functions:")
    for n, where in sorted(funcs, reverse=True)[: args.top]:
        print(f"{n:6d}  {where}")
    big = sorted(((len(p.read_text().splitlines()), p.relative_to(ROOT)) for p in files), reverse=True)
    print(f"modules over {args.max_lines} lines:")
    for n, p in big:
        if n > args.max_lines:
            print(f"{n:6d}  {p}")


if __name__ == "__main__":
    main()
