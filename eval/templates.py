"""A task's fields of one document, resolved as lm-evaluation-harness 0.4 resolves `doc_to_text`,
`doc_to_choice` and `doc_to_target` (lm_eval/api/task.py ConfigurableTask.doc_to_*).

A field is one of:
- an int (a fixed answer index, SciQ's `doc_to_target: 3`);
- a list of strings (fixed choices, BoolQ's `["no", "yes"]`);
- a string naming a key of the document (`doc_to_target: label`);
- any other string, a Jinja template rendered with the document's keys. A rendered text or target of digits only
  becomes an int (an answer index; for `doc_to_text`, Winogrande's index of the correct filled-in context), a
  target that looks like a list becomes that list, and rendered choices are read as a Python literal
  (`"{{[sol1, sol2]}}"` renders "['a', 'b']");
- a Python function of the document (a `!function` reference that names one of ours, see eval/task_yaml.py).

Templates render with StrictUndefined (a misspelled key fails rather than rendering empty), keep a trailing
newline and know lm-eval's `regex_replace` filter, as lm-eval's environment does.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from functools import lru_cache

import jinja2

Field = int | str | list | Callable | None


def _regex_replace(text: str, pattern: str, replacement: str, count: int = 0) -> str:
    return re.sub(pattern, replacement, text, count=count)


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined that also fails inside a list (`{{[sol1, sol2]}}` would otherwise render "Undefined"), so a
    row missing a field names it."""

    __repr__ = jinja2.StrictUndefined._fail_with_undefined_error


_ENVIRONMENT = jinja2.Environment(undefined=_Undefined, keep_trailing_newline=True)
_ENVIRONMENT.filters["regex_replace"] = _regex_replace


@lru_cache(maxsize=1024)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a task renders the same few templates for every document). A syntax error
    raises jinja2.TemplateSyntaxError, which eval/task_yaml.py reports with the file and key."""
    return _ENVIRONMENT.from_string(template)


def render(template: str, doc: dict) -> str:
    return compile_template(template).render(**doc)


def resolve_text(field: Field, doc: dict, has_choices: bool = True) -> str | int:
    """doc_to_text: the context string, or an int for tasks whose choices are the contexts (Winogrande)."""
    if isinstance(field, int) or callable(field):
        return field if isinstance(field, int) else field(doc)
    if field in doc:
        return doc[field]
    text = render(field, doc)
    return ast.literal_eval(text) if text.isdigit() and has_choices else text


def resolve_target(field: Field, doc: dict, has_choices: bool = True) -> int | str | list:
    """doc_to_target: an answer index, an answer string (a choice's text, or the continuation of a partial
    task) or a list of either."""
    if isinstance(field, (int, list)) or callable(field):
        return field(doc) if callable(field) else field
    if field in doc:
        return doc[field]
    text = render(field, doc)
    if text.isdigit() and has_choices:
        return ast.literal_eval(text)
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError):
            return text
    return text


def resolve_choices(field: Field, doc: dict) -> list[str]:
    """doc_to_choice: the list of choice strings."""
    if isinstance(field, list):
        return field
    if isinstance(field, dict):
        return list(field.values())
    if callable(field):
        return field(doc)
    if field in doc:
        return doc[field]
    return ast.literal_eval(render(field, doc))


def resolve_description(description: str, doc: dict) -> str:
    """The task's description (prepended to every context): a key of the document or a template."""
    if not description:
        return ""
    return doc[description] if description in doc else render(description, doc)
