"""Licence detection, propagation and classification (starcoder2/data/licence.py)."""

from __future__ import annotations

import pathlib

import pytest

from starcoder2.data.document import Document
from starcoder2.data.licence import (
    PERMISSIVE,
    assign_licences,
    classify,
    detect_header_licence,
    detect_licences,
    is_licence_file,
    keep_licence,
)

CPYTHON_LICENCE = pathlib.Path("/root/.pyenv/versions/3.11.7/lib/python3.11/LICENSE.txt")

# Short but recognisable excerpts of the real texts, wrapped as the files wrap them.
MIT = """MIT License

Copyright (c) 2024 Jane Doe

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
"""
APACHE = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION
"""
BSD_2 = """Copyright (c) 2020, Jane Doe
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.
"""
BSD_3 = BSD_2 + """3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.
"""
GPL_2 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 2, June 1991

 Copyright (C) 1989, 1991 Free Software Foundation, Inc.,
 51 Franklin Street, Fifth Floor, Boston, MA 02110-1301 USA
 Everyone is permitted to copy and distribute verbatim copies
 of this license document, but changing it is not allowed.
 ...
 By contrast, the GNU General Public License is intended to guarantee your
freedom to share and change free software. (Some other Free Software
Foundation software is covered by the GNU Lesser General Public
License instead.)
"""
GPL_3 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>
  13. Use with the GNU Affero General Public License.
  ... under version 3 of the GNU Affero General Public License into a single
combined work ...
"""
GPL_3_NOTICE = """This program is free software: you can redistribute it and/or modify
it under the terms of the GNU General Public License as published by
the Free Software Foundation, either version 3 of the License, or
(at your option) any later version.
"""
LGPL_21 = """                  GNU LESSER GENERAL PUBLIC LICENSE
                       Version 2.1, February 1999
  3. You may opt to apply the terms of the ordinary GNU General Public
License instead of this License to a given copy of the Library.  To do
this, you must alter all the notices that refer to this License, so
that they refer to the ordinary GNU General Public License, version 2,
instead of to this License.
"""
LGPL_3 = """                   GNU LESSER GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

  This version of the GNU Lesser General Public License incorporates
the terms and conditions of version 3 of the GNU General Public
License, supplemented by the additional permissions listed below.
"""
AGPL_3 = """                    GNU AFFERO GENERAL PUBLIC LICENSE
                       Version 3, 19 November 2007
  13. Remote Network Interaction; Use with the GNU General Public License.
"""
MPL_2 = """Mozilla Public License Version 2.0
==================================
1.12. "Secondary License"
    means either the GNU General Public License, Version 2.0, the GNU Lesser
    General Public License, Version 2.1, the GNU Affero General Public
    License, Version 3.0, or any later versions of those licenses.
"""
PSF_EXCERPT = """PSF LICENSE AGREEMENT FOR PYTHON 3.11
--------------------------------------

1. This LICENSE AGREEMENT is between the Python Software Foundation
("PSF"), and the Individual or Organization ("Licensee") accessing and
otherwise using this software ("Python") in source or binary form and
its associated documentation.

Python releases have also been GPL-compatible; ... previously
distributed under the GNU General Public License (GPL), the law of the
Commonwealth of Virginia shall govern this License Agreement.
"""
ISC = """Permission to use, copy, modify, and/or distribute this software for any
purpose with or without fee is hereby granted, provided that the above
copyright notice and this permission notice appear in all copies.
"""
ZERO_BSD = """Permission to use, copy, modify, and/or distribute this software for any
purpose with or without fee is hereby granted.

THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES
"""
UNLICENSE = "This is free and unencumbered software released into the public domain.\n"
ZLIB = "1. The origin of this software must not be misrepresented; you must not\n"
BOOST = "Boost Software License - Version 1.0 - August 17th, 2003\n"
CC0 = "Creative Commons Legal Code\n\nCC0 1.0 Universal\n"
EPL_2 = "Eclipse Public License - v 2.0\n"


@pytest.mark.parametrize("text, expected", [
    (MIT, ["MIT"]),
    (APACHE, ["Apache-2.0"]),
    (BSD_2, ["BSD-2-Clause"]),
    (BSD_3, ["BSD-3-Clause"]),
    (GPL_2, ["GPL-2.0"]),
    (GPL_3, ["GPL-3.0"]),
    (GPL_3_NOTICE, ["GPL-3.0"]),
    (LGPL_21, ["LGPL-2.1"]),
    (LGPL_3, ["LGPL-3.0"]),
    (AGPL_3, ["AGPL-3.0"]),
    (MPL_2, ["MPL-2.0"]),
    (PSF_EXCERPT, ["PSF-2.0"]),
    (ISC, ["ISC"]),
    (ZERO_BSD, ["0BSD"]),
    (UNLICENSE, ["Unlicense"]),
    (ZLIB, ["Zlib"]),
    (BOOST, ["BSL-1.0"]),
    (CC0, ["CC0-1.0"]),
    ("See <http://creativecommons.org/publicdomain/zero/1.0/>.\n", ["CC0-1.0"]),
    (EPL_2, ["EPL-2.0"]),
    (MIT + "\n" + APACHE, ["Apache-2.0", "MIT"]),
    ("", []),
    ("All rights reserved. Do not copy.\n", []),
    ("This project is GPL-compatible and was once under the GPL.\n", []),
])
def test_detect_licences(text, expected):
    assert detect_licences(text) == expected


@pytest.mark.skipif(not CPYTHON_LICENCE.exists(), reason=f"{CPYTHON_LICENCE} not on this machine")
def test_detect_cpython_licence_file():
    found = detect_licences(CPYTHON_LICENCE.read_text())
    assert "PSF-2.0" in found
    assert not [i for i in found if "GPL" in i]  # the history section says "GPL-compatible"
    assert classify(found) == "permissive"


@pytest.mark.parametrize("path, expected", [
    ("LICENSE", True), ("LICENCE", True), ("license.txt", True), ("LICENSE.md", True),
    ("COPYING", True), ("COPYING.LESSER", True), ("UNLICENSE", True), ("LICENSE-MIT", True),
    ("LICENSE-APACHE", True), ("MIT-LICENSE", True), ("pkg/sub/License_BSD.txt", True),
    ("NOTICE", False), ("README.md", False), ("licensed.txt", False), ("mylicense", False),
    ("src/licence.py", False), ("license/main.go", False), ("setup.py", False),
])
def test_is_licence_file(path, expected):
    assert is_licence_file(path) is expected


def test_detect_header_licence():
    src = "#!/usr/bin/env python\n# SPDX-License-Identifier: Apache-2.0 WITH LLVM-exception\nx = 1\n"
    assert detect_header_licence(src) == ["Apache-2.0"]
    assert detect_header_licence("/* SPDX-License-Identifier: (MIT OR GPL-2.0-only) */\n") == [
        "GPL-2.0-only", "MIT"]
    assert detect_header_licence("// spdx-license-identifier: mit\n") == ["MIT"]  # canonical case
    late = "\n" * 40 + "# SPDX-License-Identifier: MIT\n"
    assert detect_header_licence(late) == []
    assert detect_header_licence("print('no licence here')\n") == []


def test_classify_table():
    assert classify([]) == "no_license"
    assert classify(["", ""]) == "no_license"
    assert classify(["MIT"]) == "permissive"
    assert classify(["MIT", "Apache-2.0", "BSD-3-Clause", "PSF-2.0"]) == "permissive"
    assert classify(["GPL-3.0"]) == "non_permissive"
    assert classify(["MIT", "GPL-2.0"]) == "non_permissive"
    assert classify(["LicenseRef-proprietary"]) == "non_permissive"
    assert {"MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Unlicense", "CC0-1.0",
            "Zlib", "PSF-2.0", "BSL-1.0", "Python-2.0", "0BSD"} <= PERMISSIVE
    assert not {"GPL-2.0", "GPL-3.0", "LGPL-2.1", "LGPL-3.0", "AGPL-3.0", "MPL-2.0", "EPL-2.0"} & PERMISSIVE


def _doc(path: str, text: str = "x = 1\n") -> Document:
    return Document(text=text, repo="owner/repo", path=path)


def test_assign_licences_propagates_down_not_sideways():
    docs = [
        _doc("LICENSE", MIT),
        _doc("main.py"),
        _doc("a/LICENSE", GPL_3),
        _doc("a/x.py"),
        _doc("a/b/y.py"),
        _doc("c/z.py"),
        _doc("c/h.c", "// SPDX-License-Identifier: Apache-2.0\nint x;\n"),
        _doc("ab/w.py"),  # "ab/" is not under "a/"
    ]
    out = {d.path: d for d in assign_licences(docs)}
    assert list(out) == [d.path for d in docs]  # same files, same order, licence files kept
    assert (out["main.py"].licence, out["main.py"].licence_type) == ("MIT", "permissive")
    assert out["LICENSE"].licence == "MIT"
    for path in ("a/LICENSE", "a/x.py", "a/b/y.py"):
        assert (out[path].licence, out[path].licence_type) == ("GPL-3.0 AND MIT", "non_permissive")
    assert (out["c/z.py"].licence, out["c/z.py"].licence_type) == ("MIT", "permissive")
    assert out["c/h.c"].licence == "Apache-2.0 AND MIT"
    assert out["ab/w.py"].licence == "MIT"


def test_assign_licences_subdirectory_only_and_none():
    out = {d.path: d for d in assign_licences([
        _doc("lib/COPYING", GPL_2), _doc("lib/m.c"), _doc("tools/t.py"), _doc("README.md", "hi")])}
    assert out["lib/m.c"].licence == "GPL-2.0"
    assert (out["tools/t.py"].licence, out["tools/t.py"].licence_type) == ("", "no_license")
    assert out["README.md"].licence_type == "no_license"
    assert assign_licences([]) == []


def test_keep_licence():
    docs = assign_licences([_doc("LICENSE", AGPL_3), _doc("s.py")])
    assert [keep_licence(d) for d in docs] == ["licence:non_permissive"] * 2
    assert keep_licence(_doc("s.py").with_(licence="MIT", licence_type="permissive")) is None
    assert keep_licence(_doc("s.py")) is None  # no_license is kept, as in the Stack v2
