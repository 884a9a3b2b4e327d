"""Every SQL text flux runs names everything it calls by schema.

A name in SQL (a function, an operator, a cast's target type) is resolved
through search_path when the statement is parsed, and whatever it resolves
to runs with the rights of whoever runs the statement. flux runs SQL as the
tables' owner (src/privilege.rs), so an unqualified `now()`, `=` or `::text`
could run a caller's `app_s.now()`, operator `app_s.=` or domain
`pg_temp.text` with the owner's rights. The path is pinned to
`pg_catalog, pg_temp` as well; this test keeps the second layer: the texts
themselves qualify every function, operator and type, so a text that some
day runs without the pin stays safe.

No database is needed. Checked:
- string literals of src/*.rs that look like SQL (a statement keyword as an
  upper-case word, a `$1` parameter, `OPERATOR(` or `pg_catalog.`), plus the
  `const` strings interpolated into them as `{NAME}`; install scripts given
  to `extension_sql!` are checked like the SQL files (their bodies only);
- the dollar-quoted function bodies and DO blocks of sql/schema.sql,
  sql/finalize.sql and sql/flux_entitlements--*--*.sql (not sql/released/:
  released scripts are frozen). DDL outside bodies is bound at CREATE time,
  with pg_catalog searched first, and is not checked.

Rules, after string literals and comments are stripped:
- operator: no bare operator (`=`, `<>`, `||`, `->>`, `+`, ...) outside
  `OPERATOR(pg_catalog.X)`. Allowed: assignment in `SET col = ...` lists
  (UPDATE, ON CONFLICT DO UPDATE, SET of a setting), RAISE ... USING
  options, GET DIAGNOSTICS, `=>`, `:=`, `*` in `count(*)` / `SELECT *` /
  `x.*`, `-` of a negative number.
- implicit-operator: constructs that look `=` (or `<`, `~~`) up through
  search_path without naming it: IS [NOT] DISTINCT FROM, [NOT] IN (...),
  BETWEEN, LIKE / ILIKE / SIMILAR TO, NULLIF, a simple `CASE x WHEN`,
  JOIN ... USING. Rewrite (`OPERATOR(pg_catalog.=) ANY (ARRAY[...])`) or
  opt out where the path is pinned.
- function: every identifier followed by `(` is qualified with pg_catalog,
  flux or @extschema@ (or a schema the code interpolates, `{schema}.f(`,
  quoted there), or is an SQL keyword or construct (COALESCE, EXISTS,
  VALUES, ...), an alias's column list (`AS t (a, b)`) or a column list
  after a qualified table name.
- type: every cast `::T`, `CAST(x AS T)` and typed literal (`interval '1
  day'`) names a type qualified with pg_catalog or flux.

Not checked: SQL built at run time inside plpgsql (the strings given to
EXECUTE), and what a `{placeholder}` interpolates (a cast to one is
reported, as it cannot be told safe).

Opt-out, sparingly, for what the checker cannot tell from a violation:
`-- sql-check: ok (reason)` on the SQL line, or `// sql-check: ok (reason)`
on the Rust line before the literal (it covers that whole literal).
"""

import dataclasses
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

ALLOWED_SCHEMAS = {"pg_catalog", "flux", "@extschema@"}

OPT_OUT_SQL = re.compile(r"--\s*sql-check:\s*ok\s*\(([^)]+)\)")
OPT_OUT_RUST = re.compile(r"//\s*sql-check:\s*ok\s*\(([^)]+)\)")

# Words that may stand before "(" without being a function call.
KEYWORDS_BEFORE_PAREN = {
    # statements, clauses and connectives
    "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "ON", "USING", "JOIN",
    "THEN", "ELSE", "WHEN", "CASE", "END", "IS", "AS", "BY", "LATERAL",
    "RETURNING", "RETURN", "RETURNS", "INTO", "SET", "DO", "IF", "ELSIF",
    "WHILE", "PERFORM", "QUERY", "EXECUTE", "TABLE", "KEY", "UNIQUE", "CHECK",
    "CONFLICT", "EXISTS", "VALUES", "IN", "ANY", "ALL", "SOME", "ROW", "ARRAY",
    "CAST", "EXTRACT", "POSITION", "SUBSTRING", "TRIM", "OVERLAY", "COALESCE",
    "GREATEST", "LEAST", "NULLIF", "OVER", "FILTER", "GROUP", "PARTITION",
    "DISTINCT", "UNION", "INTERSECT", "EXCEPT", "LIMIT", "OFFSET", "HAVING",
    "WITH", "RECURSIVE", "MATERIALIZED", "DEFAULT", "BETWEEN", "LIKE",
    "ILIKE", "ESCAPE", "OPERATOR", "FOR", "UPDATE", "DELETE", "INSERT",
    "INCLUDE", "ONLY", "LOOP", "TO", "STRICT", "WINDOW", "ORDER", "RAISE",
    "EXCEPTION", "NOTICE", "USING", "FOREACH", "SLICE", "REFERENCES",
    "PRIMARY", "FOREIGN", "CONSTRAINT", "OF", "NULLS", "ASC", "DESC",
    "COLLATE", "WITHIN", "TABLESAMPLE", "ROWS", "RANGE", "BEGIN", "DECLARE",
    "LIKE", "SIMILAR", "OUT", "INOUT", "VARIADIC", "ALSO", "INSTEAD",
    "NOTHING", "MERGE", "MATCHED", "NATURAL", "CROSS", "LEFT", "RIGHT",
    "FULL", "INNER", "OUTER", "TRUE", "FALSE", "NULL", "UNKNOWN",
}

# Words that cannot be a column or alias name before an operator (for
# telling a unary minus from a binary one).
VALUE_KEYWORDS = {"TRUE", "FALSE", "NULL", "END", "CURRENT_USER", "SESSION_USER",
                  "CURRENT_TIMESTAMP", "CURRENT_DATE", "LOCALTIMESTAMP"}
NON_VALUE_KEYWORDS = KEYWORDS_BEFORE_PAREN - VALUE_KEYWORDS | {"RETURN", "ELSE", "THEN"}

# Type names that, followed by a string, make a typed literal.
TYPE_WORDS = {
    "INTERVAL", "TIMESTAMPTZ", "TIMESTAMP", "DATE", "TIME", "TIMETZ", "TEXT",
    "JSONB", "JSON", "NUMERIC", "DECIMAL", "INT", "INT2", "INT4", "INT8",
    "INTEGER", "BIGINT", "SMALLINT", "BOOLEAN", "BOOL", "BYTEA", "UUID",
    "REGCLASS", "REGTYPE", "REGPROC", "REGPROCEDURE", "REGNAMESPACE",
    "REGROLE", "OID", "NAME", "FLOAT4", "FLOAT8", "REAL", "VARCHAR", "CHAR",
    "INET", "CIDR", "MONEY", "XML", "TSQUERY", "TSVECTOR", "POINT",
}

RAISE_OPTIONS = {"ERRCODE", "MESSAGE", "DETAIL", "HINT", "COLUMN", "CONSTRAINT",
                 "DATATYPE", "TABLE", "SCHEMA"}

OP_CHARS = set("+-*/<>=~!@#%^&|`?")


@dataclasses.dataclass
class Tok:
    kind: str  # ident, qident, num, str, param, op, punct, placeholder
    text: str
    line: int

    @property
    def up(self):
        return self.text.upper() if self.kind == "ident" else None

    def is_kw(self, *words):
        return self.kind == "ident" and self.text.upper() in words


@dataclasses.dataclass
class Violation:
    file: str
    line: int
    rule: str
    message: str
    snippet: str

    def __str__(self):
        return f"{self.file}:{self.line}: [{self.rule}] {self.message}: {self.snippet}"


# --------------------------------------------------------------------------
# SQL lexer
# --------------------------------------------------------------------------

DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def lex_sql(text, lines):
    """Tokens of an SQL text. `lines[i]` is the source line of character i.
    String literals and dollar-quoted strings become one `str` token each;
    comments vanish."""
    toks = []
    i, n = 0, len(text)

    def add(kind, s, at):
        toks.append(Tok(kind, s, lines[at] if at < len(lines) else lines[-1]))

    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            continue
        # string literals, with an optional E / U& / B / X / N prefix
        m = re.match(r"(?:[EeBbXxNn]|[Uu]&)?'", text[i:])
        if m and (m.end() == 1 or not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"))):
            backslash = m.group(0)[0] in "Ee"
            j = i + m.end()
            while j < n:
                if backslash and text[j] == "\\":
                    j += 2
                    continue
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            add("str", text[i:j + 1], i)
            i = j + 1
            continue
        if c == "$":
            m = re.match(r"\$\d+", text[i:])
            if m:
                add("param", m.group(0), i)
                i += m.end()
                continue
            m = DOLLAR_TAG.match(text, i)
            if m:
                end = text.find(m.group(0), m.end())
                end = n if end < 0 else end + len(m.group(0))
                add("str", text[i:end], i)
                i = end
                continue
        if c == "{":
            # a Rust format! placeholder ({name}, {}, {0:?}); {{ is a brace
            if text.startswith("{{", i):
                add("punct", "{", i)
                i += 2
                continue
            j = text.find("}", i)
            j = n - 1 if j < 0 else j
            m = re.match(r"\.([A-Za-z_][A-Za-z0-9_]*)", text[j + 1:])
            if m:
                # {schema}.name: a name qualified with an interpolated schema
                add("ident", text[i:j + 1] + m.group(0), i)
                i = j + 1 + m.end()
                continue
            add("placeholder", text[i:j + 1], i)
            i = j + 1
            continue
        if c == '"' or c.isalpha() or c == "_" or text.startswith("@extschema@", i):
            start = i
            parts = []
            while True:
                if i < n and text[i] == '"':
                    j = i + 1
                    while j < n:
                        if text[j] == '"':
                            if j + 1 < n and text[j + 1] == '"':
                                j += 2
                                continue
                            break
                        j += 1
                    parts.append(("q", text[i:j + 1]))
                    i = j + 1
                elif text.startswith("@extschema@", i):
                    parts.append(("i", "@extschema@"))
                    i += len("@extschema@")
                elif i < n and (text[i].isalpha() or text[i] == "_"):
                    m = re.match(r"[A-Za-z_][A-Za-z0-9_$]*", text[i:])
                    parts.append(("i", m.group(0)))
                    i += m.end()
                else:
                    break
                # a dot followed by another name part (or *) continues the name
                if i + 1 < n and text[i] == "." and (
                    text[i + 1] == '"' or text[i + 1].isalpha() or text[i + 1] == "_"
                    or text.startswith("@extschema@", i + 1)
                ):
                    i += 1
                    continue
                if i + 1 < n and text[i] == "." and text[i + 1] == "*":
                    parts.append(("i", "*"))
                    i += 2
                break
            name = ".".join(p[1] for p in parts)
            kind = "ident" if len(parts) == 1 and parts[0][0] == "i" else (
                "qident" if len(parts) == 1 else "ident")
            add(kind, name, start)
            continue
        if c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            m = re.match(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text[i:])
            # 1..10 in plpgsql FOR loops: the number stops before ".."
            s = m.group(0)
            if ".." in text[i:i + len(s) + 1] and s.endswith("."):
                s = s[:-1]
            add("num", s, i)
            i += len(s)
            continue
        if text.startswith("::", i) or text.startswith(":=", i) or text.startswith("..", i):
            add("punct", text[i:i + 2], i)
            i += 2
            continue
        if c in OP_CHARS:
            j = i
            while j < n and text[j] in OP_CHARS:
                if text.startswith("--", j) or text.startswith("/*", j):
                    break
                j += 1
            op = text[i:j]
            # PostgreSQL's rule: a multi-character operator ends in + or -
            # only when it holds one of ~ ! @ # % ^ & | ` ?
            if len(op) > 1 and not set(op) & set("~!@#%^&|`?"):
                while len(op) > 1 and op[-1] in "+-":
                    op = op[:-1]
            add("op", op, i)
            i += len(op)
            continue
        add("punct", c, i)
        i += 1
    return toks


# --------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------


def schema_of(name):
    """The schema part of a qualified name (None when unqualified), quotes
    stripped; an interpolated schema ({schema}.f, computed by the code and
    quoted there) counts as @extschema@."""
    parts = split_name(name)
    if len(parts) < 2:
        return None
    return "@extschema@" if parts[0].startswith("{") else parts[0]


def split_name(name):
    out, cur, q = [], "", False
    for ch in name:
        if ch == '"':
            q = not q
            continue
        if ch == "." and not q:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return out


def is_value(t):
    """Can this token end an operand (so a following - is binary)?"""
    if t is None:
        return False
    if t.kind in ("num", "str", "param", "qident", "placeholder"):
        return True
    if t.kind == "ident":
        return t.up not in NON_VALUE_KEYWORDS
    return t.text in (")", "]")


def check_tokens(toks):
    """Violations of an SQL text's tokens: (line, rule, message, snippet)."""
    out = []

    def snippet(i, before=3, after=3):
        lo, hi = max(0, i - before), min(len(toks), i + after + 1)
        return " ".join("'…'" if t.kind == "str" else t.text for t in toks[lo:hi])

    def flag(i, rule, message):
        out.append((toks[i].line, rule, message, snippet(i)))

    def at(i):
        return toks[i] if 0 <= i < len(toks) else None

    # Collapse OPERATOR(schema.op) into one token, checking the schema.
    collapsed = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.is_kw("OPERATOR") and at(i + 1) and at(i + 1).text == "(":
            j = i + 2
            inner = []
            while j < len(toks) and toks[j].text != ")":
                inner.append(toks[j])
                j += 1
            text = "".join(x.text for x in inner)
            m = re.fullmatch(r"(.+)\.(.+)", text)
            if not m or m.group(1).strip('"') not in ALLOWED_SCHEMAS:
                out.append((t.line, "operator", "OPERATOR() must name pg_catalog", "OPERATOR(" + text + ")"))
            collapsed.append(Tok("qop", "OPERATOR(" + text + ")", t.line))
            i = j + 1
            continue
        collapsed.append(t)
        i += 1
    toks = collapsed

    depth = 0
    # SET lists: the paren depth where one is open (None when not in one)
    set_depth = None
    stmt_kind = None  # RAISE / GET while in those plpgsql statements
    cast_as = []  # paren depths of open CAST( ... )
    raise_using = False
    for i, t in enumerate(toks):
        prev, nxt = at(i - 1), at(i + 1)
        if t.text == ";" and t.kind == "punct":
            set_depth, stmt_kind, raise_using = None, None, False
            continue
        if t.kind == "punct" and t.text in "([":
            depth += 1
        elif t.kind == "punct" and t.text in ")]":
            depth -= 1
            if set_depth is not None and depth < set_depth:
                set_depth = None
            while cast_as and cast_as[-1] > depth:
                cast_as.pop()
        if t.kind == "ident":
            up = t.up
            if up == "SET":
                set_depth = depth
            elif up in ("WHERE", "FROM", "RETURNING") and set_depth == depth:
                set_depth = None
            elif up == "RAISE":
                stmt_kind = "RAISE"
            elif up == "DIAGNOSTICS" and prev is not None and prev.is_kw("GET", "CURRENT", "STACKED"):
                stmt_kind = "GET"
            elif up == "USING" and stmt_kind == "RAISE":
                raise_using = True

        # ---- operators
        if t.kind == "op":
            op = t.text
            ok = False
            if op == "=>":
                ok = True  # named argument
            elif op == "*" and (
                (prev is not None and (prev.text == "(" or prev.is_kw("SELECT", "RETURNING", "DISTINCT") or prev.text == ","))
                and (nxt is None or nxt.text in (")", ",", ";") or nxt.is_kw("FROM", "INTO"))
            ):
                ok = True  # count(*), SELECT *, RETURNING *
            elif op in ("-", "+") and not is_value(prev) and nxt is not None and nxt.kind == "num":
                ok = True  # a signed number
            elif op == "=" and prev is not None:
                before = at(i - 2)
                if set_depth is not None and depth == set_depth and (
                    (prev.kind in ("ident", "qident") and before is not None
                     and (before.is_kw("SET", "LOCAL", "SESSION") or before.text == ","))
                    or prev.text == ")"  # SET (a, b) = (...)
                ):
                    ok = True
                elif stmt_kind == "RAISE" and raise_using and prev.kind == "ident" and prev.up in RAISE_OPTIONS:
                    ok = True
                elif stmt_kind == "GET" and prev.kind == "ident" and before is not None and (
                    before.is_kw("DIAGNOSTICS") or before.text == ","
                ):
                    ok = True
            if not ok:
                flag(i, "operator", f"bare operator {op}: write OPERATOR(pg_catalog.{op})")

        # ---- constructs that look an operator up through search_path
        if t.kind == "ident":
            up = t.up
            if up == "DISTINCT" and prev is not None and prev.is_kw("IS", "NOT") and nxt is not None and nxt.is_kw("FROM"):
                flag(i, "implicit-operator", "IS [NOT] DISTINCT FROM looks up = through search_path")
            elif up == "IN" and nxt is not None and nxt.text == "(" and not (
                at(i - 2) is not None and at(i - 2).is_kw("FOR", "FOREACH")
            ):
                flag(i, "implicit-operator", "IN (...) looks up = through search_path: write OPERATOR(pg_catalog.=) ANY (ARRAY[...])")
            elif up in ("BETWEEN", "LIKE", "ILIKE", "SIMILAR"):
                flag(i, "implicit-operator", f"{up} looks up its operators through search_path")
            elif up == "NULLIF" and nxt is not None and nxt.text == "(":
                flag(i, "implicit-operator", "NULLIF looks up = through search_path")
            elif up == "CASE" and nxt is not None and not nxt.is_kw("WHEN") and not (prev is not None and prev.is_kw("END")):
                flag(i, "implicit-operator", "a simple CASE x WHEN looks up = through search_path")
            elif up == "USING" and nxt is not None and nxt.text == "(" and any(
                x.is_kw("JOIN") for x in toks[max(0, i - 8):i]
            ):
                flag(i, "implicit-operator", "JOIN ... USING looks up = through search_path")

        # ---- function calls
        if t.kind in ("ident", "qident", "placeholder") and nxt is not None and nxt.text == "(" and nxt.kind == "punct":
            name = t.text
            if t.kind == "placeholder":
                if not (prev is not None and (prev.is_kw("INTO", "TABLE", "ON", "AS", "EXISTS") or prev.kind == "ident")):
                    flag(i, "function", f"call of an interpolated name {name}: cannot be checked")
            elif schema_of(name) is not None:
                if schema_of(name) not in ALLOWED_SCHEMAS and not (prev is not None and prev.is_kw("INTO", "TABLE", "ON", "REFERENCES", "UPDATE", "FROM")):
                    flag(i, "function", f"{name}( is qualified with {schema_of(name)}, not pg_catalog or flux")
            elif t.kind == "ident" and t.up in KEYWORDS_BEFORE_PAREN:
                pass
            elif prev is not None and (prev.is_kw("AS", "ORDINALITY") or prev.text == ")"):
                pass  # an alias's column list: AS t (a, b), f(x) WITH ORDINALITY t (a, n)
            elif prev is not None and prev.is_kw("INTO", "TABLE", "REFERENCES", "UPDATE", "FROM", "JOIN"):
                flag(i, "function", f"unqualified table {name}: write flux.{name} (or pass a regclass)")
            else:
                flag(i, "function", f"unqualified function {name}(: write pg_catalog.{name}( (or flux.)")

        # ---- casts and typed literals
        if t.kind == "punct" and t.text == "::":
            ty = nxt
            if ty is None:
                continue
            if ty.kind == "placeholder":
                flag(i + 1, "type", f"cast to an interpolated type ::{ty.text}: cannot be checked")
            elif ty.kind not in ("ident", "qident") or schema_of(ty.text) not in ALLOWED_SCHEMAS:
                flag(i + 1, "type", f"unqualified cast ::{ty.text}: write ::pg_catalog.{ty.text}")
        if t.is_kw("CAST") and nxt is not None and nxt.text == "(":
            cast_as.append(depth + 1)
        if t.is_kw("AS") and cast_as and cast_as[-1] == depth and nxt is not None:
            if nxt.kind == "placeholder" or schema_of(nxt.text) not in ALLOWED_SCHEMAS:
                flag(i + 1, "type", f"unqualified type in CAST(... AS {nxt.text})")
        if t.kind == "ident" and t.up in TYPE_WORDS and nxt is not None and nxt.kind == "str" and not (
            prev is not None and prev.text == "::"
        ):
            flag(i, "type", f"typed literal {t.text} '...': write pg_catalog.{t.text.lower()} '...'")
    return out


def check_sql(text, lines, file, opted_out_lines=frozenset()):
    vs = []
    for line, rule, message, snip in check_tokens(lex_sql(text, lines)):
        if line in opted_out_lines:
            continue
        vs.append(Violation(file, line, rule, message, snip))
    return vs


# --------------------------------------------------------------------------
# Extraction: Rust string literals
# --------------------------------------------------------------------------

SQL_WORD = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP)\b")
SQL_HINT = re.compile(r"\$\d|OPERATOR\(|pg_catalog\.")
CONST_STR = re.compile(r"\bconst\s+([A-Z][A-Z0-9_]*)\s*:\s*&(?:'static\s+)?str\s*=\s*\Z")


@dataclasses.dataclass
class Literal:
    text: str
    lines: list  # source line per character of text
    start: int  # offset in the source
    line: int
    opted_out: bool
    const_name: str = None
    in_extension_sql: bool = False


def rust_literals(src):
    """String literals of a Rust source, decoded, with the source line of
    each character (a backslash-newline continuation swallows the newline
    and the next line's leading whitespace, as Rust does)."""
    out = []
    masked = list(src)  # the source with comments and literals blanked
    i, n = 0, len(src)
    src_lines = src.split("\n")

    def blank(a, b):
        for k in range(a, min(b, n)):
            if masked[k] != "\n":
                masked[k] = " "

    def line_at(off):
        return src.count("\n", 0, off) + 1

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
            continue
        if src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
            continue
        if c == "'":
            # a char literal ('x', '\n', '\u{1F600}', '\'') or a lifetime
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'])'", src[i:])
            if m:
                blank(i, i + m.end())
            i += m.end() if m else 1
            continue
        raw = re.match(r"(?:b|c)?r(#*)\"", src[i:])
        if raw and not (i > 0 and (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = raw.group(1)
            body_start = i + raw.end()
            end = src.find('"' + hashes, body_start)
            body = src[body_start:end]
            start_line = line_at(body_start)
            lines = []
            ln = start_line
            for ch in body:
                lines.append(ln)
                if ch == "\n":
                    ln += 1
            out.append(Literal(body, lines, i, start_line, False))
            blank(i, end + 1 + len(hashes))
            i = end + 1 + len(hashes)
            continue
        plain = re.match(r"(?:b|c)?\"", src[i:])
        if plain and not (i > 0 and (src[i - 1].isalnum() or src[i - 1] == "_")):
            j = i + plain.end()
            ln = line_at(j)
            start_line = ln
            chars, lines = [], []
            while j < n and src[j] != '"':
                ch = src[j]
                if ch == "\\":
                    e = src[j + 1]
                    if e == "\n":
                        j += 2
                        ln += 1
                        while j < n and src[j] in " \t\r\n":
                            if src[j] == "\n":
                                ln += 1
                            j += 1
                        continue
                    simple = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
                    if e in simple:
                        chars.append(simple[e])
                        lines.append(ln)
                        j += 2
                        continue
                    if e == "u":
                        k = src.index("}", j)
                        chars.append(chr(int(src[j + 3:k], 16)))
                        lines.append(ln)
                        j = k + 1
                        continue
                    if e == "x":
                        chars.append(chr(int(src[j + 2:j + 4], 16)))
                        lines.append(ln)
                        j += 4
                        continue
                    j += 2
                    continue
                chars.append(ch)
                lines.append(ln)
                if ch == "\n":
                    ln += 1
                j += 1
            out.append(Literal("".join(chars), lines, i, start_line, False))
            blank(i, j + 1)
            i = j + 1
            continue
        i += 1

    # test modules: their SQL is the tests', not flux's
    masked = "".join(masked)
    test_spans = []
    for m in re.finditer(r"#\[cfg\((?:test|any\(test\b)[^\]]*\]", masked):
        j = masked.find("{", m.end())
        semi = masked.find(";", m.end())
        if j < 0 or 0 <= semi < j:
            continue  # #[cfg(test)] on a use or a declaration
        depth, k = 1, j + 1
        while k < n and depth:
            if masked[k] == "{":
                depth += 1
            elif masked[k] == "}":
                depth -= 1
            k += 1
        test_spans.append((m.start(), k))
    out = [lit for lit in out if not any(a <= lit.start < b for a, b in test_spans)]

    # opt-outs, const names and extension_sql! scripts
    ext_spans = []
    for m in re.finditer(r"extension_sql!\s*\(", src):
        depth, j = 1, m.end()
        while j < n and depth:
            if src[j] == "(":
                depth += 1
            elif src[j] == ")":
                depth -= 1
            j += 1
        ext_spans.append((m.start(), j))
    for lit in out:
        before = src_lines[lit.line - 2] if lit.line >= 2 else ""
        same = src_lines[lit.line - 1]
        lit.opted_out = bool(OPT_OUT_RUST.search(before) or OPT_OUT_RUST.search(same))
        m = CONST_STR.search(src[max(0, lit.start - 200):lit.start])
        if m:
            lit.const_name = m.group(1)
        lit.in_extension_sql = any(a <= lit.start < b for a, b in ext_spans)
    return out


def looks_like_sql(text):
    return bool(SQL_WORD.search(text) or SQL_HINT.search(text))


def check_rust_file(path, rel):
    src = path.read_text()
    lits = rust_literals(src)
    sqlish = [lit for lit in lits if looks_like_sql(lit.text)]
    used = set()
    for lit in sqlish:
        used.update(re.findall(r"\{([A-Z][A-Z0-9_]*)\}", lit.text))
    vs = []
    for lit in lits:
        if lit.opted_out:
            continue
        if not (looks_like_sql(lit.text) or (lit.const_name and lit.const_name in used)):
            continue
        if lit.in_extension_sql:
            vs.extend(check_script(lit.text, lit.lines, rel, opted_out_lines(lit.text, lit.lines)))
        else:
            vs.extend(check_sql(lit.text, lit.lines, rel))
    return vs


# --------------------------------------------------------------------------
# Extraction: bodies of SQL scripts
# --------------------------------------------------------------------------


def opted_out_lines(text, lines):
    out = set()
    off = 0
    for raw in text.split("\n"):
        if OPT_OUT_SQL.search(raw):
            out.add(lines[off] if off < len(lines) else lines[-1])
        off += len(raw) + 1
    return out


def check_script(text, lines, file, opted):
    """Check the dollar-quoted bodies (functions, DO blocks) of a script."""
    vs = []
    i, n = 0, len(text)
    prev_word = ""
    while i < n:
        if text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i)
            i = n if j < 0 else j + 2
            continue
        c = text[i]
        if c == "'":
            j = i + 1
            while j < n:
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
            prev_word = ""
            continue
        if c == "$":
            m = DOLLAR_TAG.match(text, i)
            if m and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
                end = text.find(m.group(0), m.end())
                if end < 0:
                    break
                if prev_word.upper() != "IS":  # COMMENT ... IS $$...$$ is text
                    body = text[m.end():end]
                    body_lines = lines[m.end():end]
                    if body_lines:
                        vs.extend(check_sql(body, body_lines, file, opted))
                i = end + len(m.group(0))
                continue
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i:])
        if m:
            prev_word = m.group(0)
            i += m.end()
            continue
        i += 1
    return vs


def check_sql_file(path, rel):
    text = path.read_text()
    lines = []
    ln = 1
    for ch in text:
        lines.append(ln)
        if ch == "\n":
            ln += 1
    return check_script(text, lines, rel, opted_out_lines(text, lines))


def sql_files():
    sql = ROOT / "sql"
    files = [sql / "schema.sql", sql / "finalize.sql"]
    files += sorted(p for p in sql.glob("flux_entitlements--*--*.sql"))
    return [f for f in files if f.exists()]


def all_violations():
    vs = []
    for p in sorted((ROOT / "src").glob("*.rs")):
        vs.extend(check_rust_file(p, str(p.relative_to(ROOT))))
    for p in sql_files():
        vs.extend(check_sql_file(p, str(p.relative_to(ROOT))))
    return vs


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def rules_of(sql):
    lines = [1] * len(sql)
    return [v.rule for v in check_sql(sql, lines, "snippet")]


@pytest.mark.parametrize(
    "sql, rule",
    [
        ("SELECT now()", "function"),
        ("SELECT 1 WHERE a = b", "operator"),
        ("SELECT x::text", "type"),
        ("SELECT pg_catalog.count(*) FROM flux.t WHERE a <> $1", "operator"),
        ("SELECT a || b", "operator"),
        ("SELECT j ->> 'k'", "operator"),
        ("SELECT count(*) FROM flux.t", "function"),
        ("SELECT 1 WHERE a IS DISTINCT FROM b", "implicit-operator"),
        ("SELECT 1 WHERE a IN ('x', 'y')", "implicit-operator"),
        ("SELECT interval '1 day'", "type"),
        ("SELECT CAST(x AS text)", "type"),
        ("SELECT x::public.t", "type"),
        ("SELECT app_s.now()", "function"),
        ("SELECT 1 WHERE a OPERATOR(app_s.=) b", "operator"),
        ("UPDATE flux.t SET a = 1 WHERE b = 2", "operator"),
        ("UPDATE flux.t SET a = (SELECT 1 WHERE c = d)", "operator"),
        ("SELECT ARRAY[]::text[]", "type"),
        ("SELECT a - 1", "operator"),
        ("SELECT $1::{ty}", "type"),
    ],
)
def test_checker_flags(sql, rule):
    assert rule in rules_of(sql), f"the checker missed a {rule} violation in {sql!r}"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_catalog.now()",
        "SELECT 1 WHERE a OPERATOR(pg_catalog.=) b AND x::pg_catalog.text IS NULL",
        "SELECT pg_catalog.count(*), coalesce(a, b), t.* FROM flux.t AS t",
        "UPDATE flux.t SET a = 1, \"limit\" = EXCLUDED.\"limit\" WHERE b OPERATOR(pg_catalog.=) 2 RETURNING *",
        "INSERT INTO flux.t AS f (a, b) VALUES ($1, -1) ON CONFLICT (a) DO UPDATE SET b = coalesce(EXCLUDED.b, f.b)",
        "SELECT flux._f(x => 1), 'a = b', ARRAY[1, 2] -- a = b\n",
        "SELECT a OPERATOR(pg_catalog.=) ANY ($2) /* now() */",
        "BEGIN IF x THEN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format('%s', y); END IF; "
        "v := flux._f(); GET DIAGNOSTICS n = ROW_COUNT; END",
        "SELECT pg_catalog.interval '1 day', CAST(x AS pg_catalog.int8), 'x'::flux.decision",
        "SELECT CASE WHEN a THEN -1 ELSE 2 END",
    ],
)
def test_checker_passes_qualified_sql(sql):
    assert rules_of(sql) == [], f"false alarm on {sql!r}"


def test_rust_extraction():
    src = (
        'fn f() {\n'
        '    store::exec("SELECT a \\\n'
        '                 FROM flux.t WHERE a = $1", &[]);\n'
        '    let _ = r#"SELECT "x"::text"#;\n'
        '    // sql-check: ok (tested opt-out)\n'
        '    let _ = "SELECT now()";\n'
        '    let _ = "no sql here: a = b";\n'
        '    let _ = \'"\';\n'
        '}\n'
        '#[cfg(test)]\n'
        'mod tests {\n'
        '    fn t() { let _ = "SELECT now() /* } */"; }\n'
        '}\n'
    )
    lits = [lit for lit in rust_literals(src) if looks_like_sql(lit.text)]
    assert [lit.text for lit in lits] == [
        "SELECT a FROM flux.t WHERE a = $1",
        'SELECT "x"::text',
        "SELECT now()",
    ]
    assert [lit.opted_out for lit in lits] == [False, False, True]
    v = check_sql(lits[0].text, lits[0].lines, "x.rs")
    assert [(x.rule, x.line) for x in v] == [("operator", 3)]


def test_sql_bodies_extraction():
    text = (
        "CREATE TABLE flux.t (a int DEFAULT now());\n"
        "CREATE FUNCTION flux.f() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "    IF TG_OP = 'UPDATE' THEN RETURN NEW; END IF;\n"
        "    PERFORM now(); -- sql-check: ok (tested opt-out)\n"
        "END $$;\n"
        "COMMENT ON FUNCTION flux.f() IS $$ now() $$;\n"
    )
    lines = []
    ln = 1
    for ch in text:
        lines.append(ln)
        if ch == "\n":
            ln += 1
    vs = check_script(text, lines, "x.sql", opted_out_lines(text, lines))
    assert [(v.rule, v.line) for v in vs] == [("operator", 4)]


def test_every_sql_text_is_qualified():
    vs = all_violations()
    by_file = {}
    for v in vs:
        by_file.setdefault(v.file, []).append(v)
    report = "\n".join(
        f"{f}: {len(v)} violation(s)\n" + "\n".join(f"  {x}" for x in v) for f, v in sorted(by_file.items())
    )
    if vs:
        pytest.fail(
            f"{len(vs)} unqualified name(s) in SQL flux runs (rules: tests/integration/test_sql_qualified.py):\n{report}",
            pytrace=False,
        )
