"""A test-only renderer of the few Go text/template constructs an Ollama TEMPLATE of ours may use, with Go's
semantics: `{{ range .Messages }}…{{ end }}` (dot becomes each message), `{{ if eq .Role "x" }}…{{ else if eq .Role
"y" }}…{{ else }}…{{ end }}`, field output `{{ .Content }}` / `{{ .System }}`, and the `{{-` / `-}}` trim markers
(they remove all whitespace on that side). Anything else raises, so a template that grows a construct this
renderer does not know fails its test instead of passing on a guess.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_FIELD = re.compile(r"^\.([A-Za-z]+)$")
_EQ = re.compile(r'^eq \.([A-Za-z]+) "([^"\\]*)"$')


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", …) | ("action", …)] with trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    if any("{{" in t or "}}" in t for kind, t in out if kind == "text"):
        raise ValueError("unbalanced template action")
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stops: tuple[str, ...]) -> tuple[list, int, str | None]:
    """Nodes up to one of `stops` (an action text or prefix); returns (nodes, next index, the stop met)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        key = "else if" if value.startswith("else if ") else value
        if key in ("end", "else", "else if"):
            if key in stops:
                return nodes, i, value
            raise ValueError(f"unexpected {{{{ {value} }}}}")
        if value == "range .Messages":
            body, i, _ = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", body))
            i += 1
        elif value.startswith("if "):
            branches, i = _parse_if(tokens, i, value[3:])
            nodes.append(("if", branches))
        elif _FIELD.match(value):
            nodes.append(("field", _FIELD.match(value).group(1)))
            i += 1
        else:
            raise ValueError(f"construct not supported by this test renderer: {{{{ {value} }}}}")
    if stops:
        raise ValueError(f"missing {{{{ {stops[0]} }}}}")
    return nodes, i, None


def _parse_if(tokens, i, condition):
    branches = []
    while True:
        body, i, stop = _parse(tokens, i + 1, ("end", "else", "else if"))
        branches.append((_condition(condition), body))
        if stop == "end":
            return branches, i + 1
        if stop == "else":
            body, i, _ = _parse(tokens, i + 1, ("end",))
            branches.append((None, body))
            return branches, i + 1
        condition = stop[len("else if "):]


def _condition(text: str):
    m = _EQ.match(text)
    if m:
        return ("eq", m.group(1), m.group(2))
    f = _FIELD.match(text)
    if f:
        return ("truthy", f.group(1))
    raise ValueError(f"condition not supported by this test renderer: {text!r}")


def _holds(cond, dot: dict) -> bool:
    if cond is None:
        return True
    if cond[0] == "eq":
        return dot[cond[1]] == cond[2]
    return bool(dot.get(cond[1]))


def _render(nodes, dot: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "field":
            out.append(str(dot[node[1]]))
        elif kind == "range":
            for item in dot["Messages"]:
                _render(node[1], item, out)
        elif kind == "if":
            for cond, body in node[1]:
                if _holds(cond, dot):
                    _render(body, dot, out)
                    break


def render(template: str, values: dict) -> str:
    """`template` executed on `values` ({"Messages": [{"Role": …, "Content": …}], "System": …})."""
    nodes, _, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _render(nodes, values, out)
    return "".join(out)


def ollama_values(messages: list[dict], modelfile_system: str | None) -> dict:
    """What Ollama hands a `.Messages` template for a chat request: the Modelfile's SYSTEM as a first system
    message when the request has none, roles and contents as given (consecutive same-role messages joined by a
    blank line), `.System` the system messages joined."""
    msgs = list(messages)
    if modelfile_system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": modelfile_system})
    collated: list[dict] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return {"Messages": collated, "System": system}
