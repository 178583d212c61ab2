"""The page `dvc plots show` writes, rendering with no network: .dvc/plots/template.html (DVC's
`plots.html_template`, set in .dvc/config) with Vega, Vega-Lite and Vega-Embed inlined, their licences beside it.

DVC's own page (dvc_render's VegaRenderer.SCRIPTS) loads the three from cdn.jsdelivr.net, so it stays blank
offline. Our template has no `{scripts}` placeholder, which is where DVC would put those CDN tags; the libraries
are inlined rather than linked because DVC writes the page wherever `-o` (or the working directory) says, where a
relative link would miss. The versions are the ones DVC's page names (a test checks them against dvc_render).

    python scripts/offline_plots.py            # npm pack the pinned versions, check them, rewrite .dvc/plots/
    python scripts/offline_plots.py --check    # only check the checked-in template (what tests/test_plots.py does)
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLOTS = REPO / ".dvc" / "plots"
TEMPLATE = PLOTS / "template.html"

# (npm package, version, file in its tarball, sha256 of that file): the builds jsDelivr serves for DVC's page.
LIBRARIES = (
    ("vega", "5.20.2", "build/vega.min.js", "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be"),
    ("vega-lite", "5.2.0", "build/vega-lite.min.js",
     "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb"),
    ("vega-embed", "6.18.2", "build/vega-embed.min.js",
     "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e"),
)

HEAD = """<!DOCTYPE html>
<!-- `dvc plots show`'s page (.dvc/config: plots.html_template), rendering offline: Vega, Vega-Lite and Vega-Embed
     are inlined below instead of loaded from a CDN. Written by scripts/offline_plots.py; their licences (BSD-3-Clause)
     are beside this file: LICENSE.vega, LICENSE.vega-lite, LICENSE.vega-embed. -->
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
"""
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
SCRIPT = '<script data-library="{name}@{version}" data-sha256="{sha256}">\n{code}</script>\n'
INLINED = re.compile(r'<script data-library="([^"@]+)@([^"]+)" data-sha256="([0-9a-f]{64})">\n(.*?)</script>\n',
                     re.DOTALL)
# What DVC's HTML class replaces anywhere in the template (dvc_render.html.HTML.embed), and what ends a script.
FORBIDDEN_IN_CODE = ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def template(codes: dict[str, bytes]) -> str:
    """The page, each library's code inlined verbatim (checked against its pinned sha256 first)."""
    parts = [HEAD]
    for name, version, path, digest in LIBRARIES:
        code = codes[name]
        if sha256(code) != digest:
            raise SystemExit(f"{name}@{version} {path}: sha256 {sha256(code)}, pinned {digest}; not written")
        text = code.decode("utf-8")
        if any(bad in text for bad in FORBIDDEN_IN_CODE):
            raise SystemExit(f"{name}@{version} {path} contains one of {FORBIDDEN_IN_CODE}: it cannot be inlined")
        parts.append(SCRIPT.format(name=name, version=version, sha256=digest, code=text))
    return "".join(parts) + TAIL


def problems(text: str | None = None) -> list[str]:
    """What is wrong with the checked-in template: a library missing, changed or unpinned, an external script, a
    licence missing."""
    text = TEMPLATE.read_text(encoding="utf-8") if text is None else text
    found = {name: (version, digest, code) for name, version, digest, code in INLINED.findall(text)}
    wrong = []
    for name, version, _, digest in LIBRARIES:
        have = found.pop(name, None)
        if have is None:
            wrong.append(f"{name}@{version} is not inlined")
        elif have[:2] != (version, digest) or sha256(have[2].encode("utf-8")) != digest:
            wrong.append(f"{name}: inlined {have[0]} with sha256 {sha256(have[2].encode('utf-8'))}, pinned "
                         f"{version} {digest}")
        if not (PLOTS / f"LICENSE.{name}").is_file():
            wrong.append(f"{PLOTS / f'LICENSE.{name}'} is missing")
    wrong += [f"{name} is inlined but not pinned in LIBRARIES" for name in found]
    outside = INLINED.sub("", text)
    wrong += [f"an external script: {tag}" for tag in re.findall(r"<script[^>]*\bsrc=[^>]*>", outside)]
    wrong += [f"no {{{p}}} placeholder" for p in ("plot_divs", "refresh_tag") if f"{{{p}}}" not in outside]
    if "{scripts}" in outside:
        wrong.append("a {scripts} placeholder: DVC would put its CDN script tags there")
    return wrong


def npm_pack(folder: Path) -> dict[str, tarfile.TarFile]:
    specs = [f"{name}@{version}" for name, version, _, _ in LIBRARIES]
    try:
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=folder, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit("offline_plots: npm not found; install it (apt-get install npm) and rerun") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"offline_plots: `npm pack {' '.join(specs)}` failed: {last[0]}; is npm's registry "
                         "reachable?") from None
    return {name: tarfile.open(folder / f"{name}-{version}.tgz") for name, version, _, _ in LIBRARIES}


def write() -> None:
    """npm pack the pinned versions, then write the template and the licences from the tarballs."""
    with tempfile.TemporaryDirectory() as tmp:
        tarballs = npm_pack(Path(tmp))
        codes = {name: tarballs[name].extractfile(f"package/{path}").read() for name, _, path, _ in LIBRARIES}
        licences = {name: tarballs[name].extractfile("package/LICENSE").read() for name, *_ in LIBRARIES}
    PLOTS.mkdir(exist_ok=True)
    TEMPLATE.write_text(template(codes), encoding="utf-8")
    for name, text in licences.items():
        (PLOTS / f"LICENSE.{name}").write_bytes(text)
    print(f"wrote {TEMPLATE.relative_to(REPO)} and the licences beside it")


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        wrong = problems()
        print("; ".join(wrong) if wrong else f"{TEMPLATE.relative_to(REPO)}: OK")
        return 1 if wrong else 0
    if argv[1:]:
        print("usage: python scripts/offline_plots.py [--check]", file=sys.stderr)
        return 2
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
