"""JSON mode for local generation: a bounded grammar, and closing an answer that ``max_tokens`` cut.

Used by ``server.local`` (event-loop thread); pure, no model.

- ``JSON_OBJECT_GBNF`` is what ``response_format: {"type": "json_object"}`` generates under: any
  JSON object, but bounded, so a small model cannot wander forever inside one string: strings
  of at most 64 characters, at most 12 members or items per container, at most 3 levels,
  single spaces only. (A ``json_schema`` gets llama-cpp-python's converter's grammar instead,
  bounded by what the schema says.)
- ``closing(text)`` is what to append to JSON that was cut by ``max_tokens`` so that it parses:
  it closes an open string (finishing a half-written escape), completes a half-written literal
  or number, gives a dangling key or colon a ``null`` value, turns a dangling comma into one
  more member (``"_truncated": true`` in an object, ``null`` in an array), and closes every
  open container. Only appends, so a stream can send it as its last delta. The answer keeps
  ``finish_reason: "length"``: it parses, and the client can see it was cut (with a schema,
  required keys may then be missing).
"""

from __future__ import annotations

_STR = r'"\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) ){0,64} "\""'
JSON_OBJECT_GBNF = rf"""
root   ::= obj1
obj1   ::= "{{" ws ( str ws ":" ws val2 ( "," ws str ws ":" ws val2 ){{0,11}} )? ws "}}"
val2   ::= obj2 | arr2 | scalar
obj2   ::= "{{" ws ( str ws ":" ws val3 ( "," ws str ws ":" ws val3 ){{0,11}} )? ws "}}"
arr2   ::= "[" ws ( val3 ( "," ws val3 ){{0,11}} )? ws "]"
val3   ::= obj3 | arr3 | scalar
obj3   ::= "{{" ws ( str ws ":" ws scalar ( "," ws str ws ":" ws scalar ){{0,11}} )? ws "}}"
arr3   ::= "[" ws ( scalar ( "," ws scalar ){{0,11}} )? ws "]"
scalar ::= str | num | "true" | "false" | "null"
str    ::= {_STR}
num    ::= "-"? ( [0-9] | [1-9] [0-9]{{1,15}} ) ( "." [0-9]{{1,10}} )? ( [eE] [-+]? [0-9]{{1,3}} )?
ws     ::= " "?
"""

_LITERALS = ("true", "false", "null")


def closing(text: str) -> str:
    """What to append to a JSON prefix so that it parses ("" when it already is complete)."""
    if not text.strip():
        return "{}"
    stack: list[str] = []          # "{" or "["
    in_string = False
    escape = ""                    # the escape being read inside a string ("\\", "\\u12"...)
    key_pending = False            # in an object: a key string was read, its ':' not yet
    expect = "value"               # what the grammar wants next: "value", "key", "after" (',' or close)
    is_key = False
    token = ""                     # a literal or number being read
    for ch in text:
        if in_string:
            if escape:
                escape += ch
                if escape[1] != "u" or len(escape) == 6:
                    escape = ""
            elif ch == "\\":
                escape = "\\"
            elif ch == '"':
                in_string = False
                if is_key:
                    key_pending = True
                else:
                    expect = "after"
            continue
        if token and not (ch.isalnum() or ch in ".+-"):
            token = ""
            expect = "after"
        if ch in " \t\r\n":
            continue
        if ch == '"':
            in_string, is_key = True, expect == "key"
        elif ch in "{[":
            stack.append(ch)
            expect = "key" if ch == "{" else "value"
        elif ch in "}]":
            if stack:
                stack.pop()
            expect = "after"
        elif ch == ":":
            key_pending, expect = False, "value"
        elif ch == ",":
            expect = "key" if stack and stack[-1] == "{" else "value"
        else:
            token += ch
    out = ""
    if in_string:
        if escape:
            out += ("\\" if escape == "\\" else "0" * (6 - len(escape)))
        out += '"'
        if is_key:
            key_pending = True
        else:
            expect = "after"
    elif token:
        out += _finish_token(token)
        expect = "after"
    if key_pending:
        out += ": null"
        expect = "after"
    elif expect == "value" and stack and text.rstrip()[-1:] in (":", ","):
        out += "null"
    elif expect == "key" and text.rstrip()[-1:] == ",":
        out += '"_truncated": true'
    for opener in reversed(stack):
        out += "}" if opener == "{" else "]"
    return out


def _finish_token(token: str) -> str:
    for literal in _LITERALS:
        if literal.startswith(token):
            return literal[len(token):]
    if token[-1] in "-+.eE":
        return "0"
    return ""
