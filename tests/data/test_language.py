import pytest

from starcoder2.data.language import is_vendor, language_of


@pytest.mark.parametrize("path, language", [
    ("src/pkg/mod.py", "Python"),
    ("a/b/main.C", "C"),  # extensions are matched without case (Linguist would say C++ here)
    ("lib.rs", "Rust"),
    ("index.d.ts", "TypeScript"),
    ("app/view.tsx", "TypeScript"),
    ("Main.java", "Java"),
    ("x.hpp", "C++"),
    ("run.sh", "Shell"),
    ("docs/index.rst", "reStructuredText"),
    ("README.md", "Markdown"),
    ("notes.txt", "Text"),
    ("pyproject.toml", "TOML"),
    ("ci.yml", "YAML"),
    ("make.bat", "Batchfile"),
    ("setup.ps1", "PowerShell"),
    ("man/ls.1", "Roff"),
    ("paper.tex", "TeX"),
    ("setup.cfg", "INI"),
    ("Program.cs", "C#"),
    ("Makefile", "Makefile"),
    ("sub/dir/GNUmakefile", "Makefile"),
    ("docker/Dockerfile", "Dockerfile"),
    ("Dockerfile.dev", "Dockerfile"),
    ("CMakeLists.txt", "CMake"),  # the file name wins over the .txt extension
    ("cmake/FindFoo.cmake", "CMake"),
    ("Gemfile", "Ruby"),
    (".bashrc", "Shell"),
])
def test_language_from_name(path, language):
    assert language_of(path) == language


@pytest.mark.parametrize("first_line, language", [
    ("#!/usr/bin/env python3", "Python"),
    ("#!/usr/bin/python3.11 -u", "Python"),
    ("#!/bin/sh", "Shell"),
    ("#!/usr/bin/env bash", "Shell"),
    ("#!/usr/bin/env -S node --harmony", "JavaScript"),
    ("#!/usr/bin/perl -w", "Perl"),
    ("#!/usr/bin/env fancy-interpreter", None),
    ("# not a shebang", None),
])
def test_language_from_shebang(first_line, language):
    assert language_of("bin/tool", first_line + "\nbody\n") == language


def test_extension_wins_over_shebang_and_unknown_is_none():
    assert language_of("script.rb", "#!/usr/bin/env python\n") == "Ruby"
    assert language_of("data.unknownext") is None
    assert language_of("data.unknownext", "plain text\n") is None
    assert language_of("bin/tool") is None
    assert language_of("archive.tar.gz") is None


@pytest.mark.parametrize("path, vendored", [
    ("node_modules/left-pad/index.js", True),
    ("web/static/node_modules/x.js", True),
    ("vendor/github.com/pkg/errors/errors.go", True),
    ("third_party/zlib/inflate.c", True),
    ("assets/app.min.js", True),
    ("static/jquery-3.6.0.js", True),
    ("dist/bundle.js", True),
    ("lib/python3.11/site-packages/requests/api.py", True),
    ("src/app.js", False),
    ("src/vendored_names.py", False),
    ("src/distance.py", False),
    ("tools/minify.js", False),
])
def test_is_vendor(path, vendored):
    assert is_vendor(path) is vendored
