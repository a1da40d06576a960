"""Language identification from a file's name (and shebang line), with Linguist language names.

`language_of(path, text)` tries, in order: a well-known file name (Makefile, Dockerfile,
CMakeLists.txt, ...), the extension, and, when neither is known, the interpreter on a `#!` first line.
`is_vendor(path)` flags vendored or bundled code (node_modules/, vendor/, *.min.js, ...) with a short
regex list in the spirit of Linguist's vendor.yml.

Left out, on purpose: go-enry / Linguist's modelines, content heuristics for ambiguous extensions
(`.h` is always C, `.m` Objective-C, `.pl` Perl, `.v` Verilog) and the Bayesian classifier, and
`is_generated`. Stack v2 used go-enry (data-pipeline.md §3.2); this compact table covers the common
languages and returns None for everything else, which callers treat as "not code we know".
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# Extension (lower case, without the dot) -> language. One line per language keeps the table readable.
_EXTENSIONS_BY_LANGUAGE = {
    "Python": "py pyi pyw",
    "C": "c h",
    "C++": "cc cpp cxx c++ hh hpp hxx h++ ipp inl tpp",
    "C#": "cs csx",
    "Objective-C": "m",
    "Java": "java",
    "Kotlin": "kt kts",
    "Scala": "scala sc",
    "Groovy": "groovy gradle",
    "JavaScript": "js mjs cjs jsx",
    "TypeScript": "ts mts cts tsx",
    "Go": "go",
    "Rust": "rs",
    "Swift": "swift",
    "Dart": "dart",
    "Ruby": "rb rake gemspec",
    "PHP": "php phtml",
    "Perl": "pl pm t",
    "Lua": "lua",
    "R": "r",
    "Julia": "jl",
    "Haskell": "hs lhs",
    "OCaml": "ml mli",
    "Elixir": "ex exs",
    "Erlang": "erl hrl",
    "Clojure": "clj cljs cljc edn",
    "F#": "fs fsi fsx",
    "Zig": "zig",
    "Nim": "nim",
    "Fortran": "f f90 f95 f03 f08 for",
    "Assembly": "asm s nasm",
    "WebAssembly": "wat wast",
    "CUDA": "cu cuh",
    "Verilog": "v",
    "VHDL": "vhd vhdl",
    "Shell": "sh bash zsh ksh",
    "PowerShell": "ps1 psm1 psd1",
    "Batchfile": "bat cmd",
    "SQL": "sql",
    "Makefile": "mk mak",
    "Dockerfile": "dockerfile",
    "CMake": "cmake",
    "HTML": "html htm xhtml",
    "CSS": "css",
    "SCSS": "scss",
    "Less": "less",
    "Vue": "vue",
    "XML": "xml xsd xsl xslt plist",
    "SVG": "svg",
    "JSON": "json jsonl geojson",
    "YAML": "yaml yml",
    "TOML": "toml",
    "INI": "ini cfg",
    "Markdown": "md markdown mdx",
    "reStructuredText": "rst",
    "TeX": "tex sty cls",
    "Roff": "roff 1 2 3 4 5 6 7 8 9 man",
    "Text": "txt",
    "Protocol Buffer": "proto",
    "Jupyter Notebook": "ipynb",
}
EXTENSIONS = {ext: lang for lang, exts in _EXTENSIONS_BY_LANGUAGE.items() for ext in exts.split()}

# Exact file names, matched before extensions (CMakeLists.txt is CMake, not Text).
FILENAMES = {
    "Makefile": "Makefile", "makefile": "Makefile", "GNUmakefile": "Makefile",
    "Dockerfile": "Dockerfile", "Containerfile": "Dockerfile",
    "CMakeLists.txt": "CMake",
    "Rakefile": "Ruby", "Gemfile": "Ruby", "Vagrantfile": "Ruby", "Podfile": "Ruby",
    "Jenkinsfile": "Groovy",
    "Pipfile": "TOML", "Cargo.lock": "TOML",
    ".bashrc": "Shell", ".bash_profile": "Shell", ".zshrc": "Shell", ".profile": "Shell",
    "README": "Text", "LICENSE": "Text", "COPYING": "Text", "NOTES": "Text", "TODO": "Text",
    "AUTHORS": "Text", "INSTALL": "Text", "NEWS": "Text",
}

# Interpreter (version digits removed: python3.11 -> python) -> language.
INTERPRETERS = {
    "python": "Python", "pypy": "Python",
    "sh": "Shell", "bash": "Shell", "zsh": "Shell", "dash": "Shell", "ksh": "Shell",
    "node": "JavaScript", "nodejs": "JavaScript", "deno": "TypeScript", "ts-node": "TypeScript",
    "ruby": "Ruby", "perl": "Perl", "php": "PHP", "lua": "Lua", "rscript": "R", "julia": "Julia",
    "pwsh": "PowerShell", "make": "Makefile",
}

_VENDOR = re.compile(
    r"(^|/)(node_modules|bower_components|vendors?|third[-_]?party|3rd[-_]?party|external|deps"
    r"|dist|site-packages|dist-packages|\.venv|venv|virtualenv|__pycache__|Pods|Carthage|Godeps|\.yarn)/"
    r"|[.-]min\.(js|css)$|(^|/)jquery[^/]*\.js$|(^|/)bootstrap[^/]*\.(js|css)$",
    re.IGNORECASE,
)


def language_of(path: str, text: str | None = None) -> str | None:
    """Linguist-style language name of `path`, or None when unknown. `text` is only read for a shebang."""
    name = PurePosixPath(path).name
    if name in FILENAMES:
        return FILENAMES[name]
    if name.startswith("Dockerfile."):  # Dockerfile.dev, Dockerfile.prod
        return "Dockerfile"
    if "." in name.lstrip("."):
        language = EXTENSIONS.get(name.rsplit(".", 1)[1].lower())
        if language is not None:
            return language
    return _shebang_language(text) if text else None


def _shebang_language(text: str) -> str | None:
    first = text.partition("\n")[0]
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if words and PurePosixPath(words[0]).name == "env":  # #!/usr/bin/env -S VAR=1 python3 -u
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if not words:
        return None
    interpreter = re.sub(r"[\d.]+$", "", PurePosixPath(words[0]).name.lower())
    return INTERPRETERS.get(interpreter)


def is_vendor(path: str) -> bool:
    """True for vendored, bundled or minified files (dependency directories, build outputs)."""
    return _VENDOR.search(path) is not None
