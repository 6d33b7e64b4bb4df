"""`code` tasks: a source file in, a `CodeAnalysis` out (language, summary, entities with their
purposes, dependencies, issues). Same path as `graph`: chunks under one JSON Schema in one batcher
request, then merged. The language comes from the request, the file name, or the text itself."""
from __future__ import annotations

import re
from pathlib import PurePosixPath

from schemas.envelope import CodeTask
from schemas.graph import CodeAnalysis, CodeAnalysisChunk, CodeEntity, CodeIssue
from schemas.result import CodeOutput
from worker.engine import Generation
from worker.tasks.base import Started, TaskContext
from worker.tasks.chunking import chunk_limit, parse_chunks, split_into_chunks, submit_chunks

CODE_SCHEMA = CodeAnalysisChunk.model_json_schema()

EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript", ".go": "go", ".rs": "rust", ".java": "java",
    ".kt": "kotlin", ".scala": "scala", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
    ".hpp": "cpp", ".cs": "csharp", ".rb": "ruby", ".php": "php", ".swift": "swift", ".sh": "shell",
    ".bash": "shell", ".zsh": "shell", ".pl": "perl", ".lua": "lua", ".r": "r", ".sql": "sql", ".hs": "haskell",
    ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".dart": "dart", ".m": "objective-c", ".jl": "julia",
    ".html": "html", ".css": "css", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json",
}
SPECIAL_NAMES = {"makefile": "make", "dockerfile": "dockerfile", "cmakelists.txt": "cmake"}
INTERPRETERS = {"python": "python", "node": "javascript", "bash": "shell", "sh": "shell", "zsh": "shell",
                "ruby": "ruby", "perl": "perl", "php": "php", "lua": "lua", "deno": "typescript"}
# Signs in the text itself, most specific first; the first that matches wins.
CONTENT_SIGNS: list[tuple[str, str]] = [
    ("php", r"<\?php"),
    ("go", r"^package \w+\s*$[\s\S]*^(import|func) "),
    ("rust", r"^\s*(pub )?fn \w+|^use \w+::|\blet mut\b"),
    ("cpp", r"^#include\s*<(iostream|vector|string|memory)>|\bstd::|^\s*template\s*<"),
    ("c", r"^#include\s*[<\"]"),
    ("java", r"^\s*(public |private )?(final )?class \w+.*\{|^import java\."),
    ("python", r"^\s*(def \w+\(.*\)\s*(->.*)?:|class \w+(\(.*\))?:|from [\w.]+ import |import \w+\s*$)"),
    ("typescript", r"^\s*(interface \w+|type \w+ =)|:\s*(string|number|boolean)\b"),
    ("javascript", r"^\s*(const|let|var) \w+ = |\bfunction \w*\(|=>\s*\{|require\(|module\.exports"),
    ("ruby", r"^\s*(def \w+|end)\s*$|^require '"),
    ("shell", r"^\s*(if \[|fi$|echo |export \w+=)"),
]

PROMPT_HEAD = (
    "Analyse each source file and describe it as JSON.\n\n"
    "File: greet.py (python)\n"
    "import sys\n\n"
    "def greet(name):\n"
    '    print("Hello " + name)\n'
    'JSON: {"language": "python", "summary": "Prints a greeting.", '
    '"entities": [{"kind": "function", "name": "greet", "purpose": "Prints a greeting for a name."}], '
    '"dependencies": ["sys"], '
    '"issues": [{"severity": "warning", "message": "sys is imported but never used."}]}\n\n'
)


def guess_language(*, filename: str | None, source: str) -> tuple[str | None, str]:
    """The language and where it came from: the file name's extension, a shebang, or signs in the text."""
    if filename:
        name = PurePosixPath(filename.replace("\\", "/")).name.lower()
        if name in SPECIAL_NAMES:
            return SPECIAL_NAMES[name], "filename"
        if PurePosixPath(name).suffix in EXTENSIONS:
            return EXTENSIONS[PurePosixPath(name).suffix], "filename"
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    if first.startswith("#!"):
        words = re.split(r"[\s/]+", first[2:])
        for word in reversed([w for w in words if w and w != "env" and not w.startswith("-")]):
            interpreter = re.sub(r"[\d.]+$", "", word)
            if interpreter in INTERPRETERS:
                return INTERPRETERS[interpreter], "content"
    head = source[:20_000]
    for language, pattern in CONTENT_SIGNS:
        if re.search(pattern, head, flags=re.MULTILINE):
            return language, "content"
    return None, "model"


def render_prompt(chunk: str, *, filename: str | None, language: str | None) -> str:
    name = PurePosixPath((filename or "source").replace("\\", "/")).name
    body = chunk.strip("\n")
    return f"{PROMPT_HEAD}File: {name} ({language or 'unknown'})\n{body}\nJSON: "


def check(task: CodeTask, ctx: TaskContext) -> None:
    """This worker's limits on the task's parameters (no tokenizing)."""
    ctx.engine.check_generate_args(max_new_tokens=task.payload.max_tokens, temperature=0.0, top_p=1.0, stop=None)


def start(task: CodeTask, ctx: TaskContext) -> Started:
    p = task.payload
    check(task, ctx)
    if p.language:
        language, source = p.language.strip().lower(), "payload"
    else:
        language, source = guess_language(filename=p.filename, source=p.source)
    render = lambda chunk: render_prompt(chunk, filename=p.filename, language=language)  # noqa: E731
    overhead = len(ctx.engine.tokenizer(render(""))["input_ids"]) + 1
    size = chunk_limit(ctx.engine, prompt_overhead=overhead, max_tokens=p.max_tokens, requested=p.chunk_tokens)
    chunks = split_into_chunks(ctx.engine, p.source, chunk_tokens=size, what="source")
    request = submit_chunks(ctx, chunks, render=render, schema=CODE_SCHEMA, max_tokens=p.max_tokens)

    def finish(out: list[Generation]) -> CodeOutput:
        analysis = merge_analyses(parse_chunks(request, out, CodeAnalysisChunk), language=language)
        return CodeOutput(analysis=analysis, language_from=source, chunks=len(chunks),
                          prompt_tokens=sum(g.prompt_tokens for g in out),
                          completion_tokens=sum(len(g.token_ids) for g in out))

    return Started(future=request.future, finish=finish)


def merge_analyses(parts: list[CodeAnalysisChunk], *, language: str | None) -> CodeAnalysis:
    """One analysis from the chunks': entities, dependencies and issues de-duplicated in order,
    the summaries joined; a known language wins over the model's guess."""
    entities: dict[tuple[str, str], CodeEntity] = {}
    issues: dict[tuple[str, str], CodeIssue] = {}
    for part in parts:
        for entity in part.entities:
            entities.setdefault((entity.kind, entity.name.strip()), entity)
        for issue in part.issues:
            issues.setdefault((issue.severity, " ".join(issue.message.split()).casefold()), issue)
    dependencies = dict.fromkeys(d.strip() for part in parts for d in part.dependencies if d.strip())
    summaries = dict.fromkeys(" ".join(part.summary.split()) for part in parts if part.summary.strip())
    return CodeAnalysis(
        language=(language or parts[0].language.strip().lower() or "unknown")[:20],
        summary=" ".join(summaries)[:2000],
        entities=list(entities.values()),
        dependencies=list(dependencies),
        issues=list(issues.values()),
    )
