"""Documents: add (JSON or file upload, indexed in the background as a job), list, get, delete;
and the jobs to poll. Ids are opaque strings, never paths on the server."""
from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.deps import IndexerDep, ServiceDep
from api.errors import ApiError
from api.schemas import (ChunkInfo, Deleted, DocumentDetail, DocumentIn, DocumentList, DocumentOut, ErrorOut,
                         JobOut)
from api.worker import QueueFull
from retrieval import Document, rules
from retrieval.formats import Extracted, Unreadable, extract_bytes
from retrieval.loaders import JsonlError, jsonl_objects
from retrieval.registry import Registry

router = APIRouter(prefix="/v1", tags=["documents"])

DocIdPath = Annotated[str, Path(description="the document id (may contain '/')", max_length=256)]
NOT_FOUND = {404: {"model": ErrorOut, "description": "no such document"}}

_UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": DocumentIn.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "any format `ragblend index` reads (PDF, DOCX, HTML, RST, Markdown, text of any "
                                "encoding: one document) or .jsonl (`{\"id\"?, \"text\", ...}` a line)"},
        "id": {"type": "string", "description": "document id (default: the file's name; an upload of the same "
                                                "name replaces it)"},
        "metadata": {"type": "string", "description": "a JSON object, for one-document files"}}}}}}}


@router.post("/documents", status_code=202, response_model=JobOut, openapi_extra=_UPLOAD_DOC,
             summary="Add or replace documents; indexed in the background",
             description="A JSON document `{id?, text, metadata?}` or a multipart file upload. Answers 202 "
                         "with a job to poll at `GET /v1/jobs/{job_id}` (also in `Location`). A document "
                         "becomes visible to queries all at once, when its job commits it.",
             responses={400: {"model": ErrorOut, "description": "the file yields no text (the reason `ragblend index` "
                                                               "would skip it) or a JSONL line is bad"},
                        413: {"model": ErrorOut, "description": "upload too large"},
                        415: {"model": ErrorOut, "description": "neither JSON nor a file upload, or a binary format "
                                                               "nothing reads (images, archives)"},
                        422: {"model": ErrorOut, "description": "a field is invalid"},
                        503: {"model": ErrorOut, "description": "too many indexing jobs waiting; see Retry-After"}})
async def add_documents(request: Request, response: Response, indexer: IndexerDep) -> JobOut:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        docs = await _from_upload(request)
    elif media == "application/json" or media.endswith("+json"):
        body = await request.body()
        if not body.strip():
            raise ApiError(422, "a JSON request body is required: {\"text\": ..., \"id\"?: ..., \"metadata\"?: {...}}")
        docs = [_document(_validate_json(body), source="api")]
    else:
        raise ApiError(415, "send a JSON document {text, id?, metadata?} as application/json, or a file "
                            "as multipart/form-data in the field `file`")
    try:
        job = indexer.submit(docs)
    except QueueFull as e:
        raise ApiError(503, f"too many indexing jobs waiting; retry in {e.retry_after} s",
                       headers={"Retry-After": str(e.retry_after)}) from None
    response.headers["Location"] = f"/v1/jobs/{job.job_id}"
    return JobOut(**job.as_dict())


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], summary="An indexing job's status",
            description="`queued`, `running`, `succeeded` (with the indexing report), `failed` (with the "
                        "error) or `interrupted`: the server stopped before the job finished, and its report "
                        "counts the documents it had committed. Jobs are kept in the registry, so a "
                        "restarted server still answers for the last 1000.",
            responses={404: {"model": ErrorOut, "description": "no such job"}})
def get_job(job_id: Annotated[str, Path(max_length=64)], indexer: IndexerDep) -> JobOut:
    job = indexer.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}")
    return JobOut(**job)


@router.get("/documents", response_model=DocumentList, summary="List indexed documents",
            description="Sorted by id; `offset` and `limit` page through them.")
def list_documents(service: ServiceDep, offset: Annotated[int, Query(ge=0)] = 0,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DocumentList:
    docs = service.corpus.registry.list_documents()
    return DocumentList(documents=[_doc_out(d) for d in docs[offset:offset + limit]], total=len(docs),
                        offset=offset, limit=limit)


@router.get("/documents/{doc_id:path}", response_model=DocumentDetail, responses=NOT_FOUND,
            summary="One document and its chunks")
def get_document(doc_id: DocIdPath, service: ServiceDep) -> DocumentDetail:
    found = _snapshot(service.corpus.registry, doc_id)
    if found is None:
        raise ApiError(404, f"no document {doc_id!r}")
    doc, chunks = found
    return DocumentDetail(**_doc_out(doc).model_dump(), chunks=[
        ChunkInfo(chunk_id=c["chunk_id"], index=c["idx"], start=c["start"], end=c["end"], n_tokens=c["n_tokens"])
        for c in chunks])


@router.delete("/documents/{doc_id:path}", response_model=Deleted, responses=NOT_FOUND,
               summary="Delete a document: its vectors, registry rows and KV entries",
               description="Waits for an indexing write in progress (one writer at a time). A job still "
                           "queued for the same id will add it again.")
def delete_document(doc_id: DocIdPath, service: ServiceDep) -> Deleted:
    if not service.delete_document(doc_id):
        raise ApiError(404, f"no document {doc_id!r}")
    return Deleted(doc_id=doc_id)


# -- helpers ------------------------------------------------------------------------------------
def _doc_out(d: dict) -> DocumentOut:
    metadata = d["metadata"]
    if problem := rules.metadata_problem(metadata):
        # Stored before the limits existed: one such row must not break every listing.
        metadata = {"_invalid": f"the stored metadata is {problem}; delete the document and add it again"}
    return DocumentOut(doc_id=d["doc_id"], source=d["source"], n_chunks=d["n_chunks"], metadata=metadata,
                       updated_at=d["updated_at"])


def _snapshot(registry: Registry, doc_id: str) -> tuple[dict, list[dict]] | None:
    """The document row and its chunks as of one commit. They are two reads; a writer replaces
    both in one transaction and always rewrites the row (new updated_at), so an unchanged row
    before and after the chunk read proves the chunks belong to it."""
    for _ in range(10):
        doc = registry.get_document(doc_id)
        if doc is None:
            return None
        chunks = registry.chunks_of(doc_id)
        if registry.get_document(doc_id) == doc:
            return doc, chunks
    raise ApiError(503, f"document {doc_id!r} keeps changing; retry", headers={"Retry-After": "1"})


def _validate_json(body: bytes) -> DocumentIn:
    # Python's parser, as FastAPI's own bodies: a lone surrogate escape parses, and the field's
    # validator names it; nesting past the parser is a ValueError here.
    try:
        obj = rules.loads(body)
    except ValueError as e:
        raise ApiError(422, f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(422, "the request body must be a JSON object {text, id?, metadata?}")
    try:
        return DocumentIn.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError(_errors(e, ("body",))) from None


def _validate(where: tuple, **fields: Any) -> DocumentIn:
    try:
        return DocumentIn(**fields)
    except ValidationError as e:
        raise RequestValidationError(_errors(e, where)) from None


def _errors(e: ValidationError, where: tuple) -> list[dict]:
    return [{"type": x["type"], "loc": (*where, *x["loc"]), "msg": x["msg"], "ctx": x.get("ctx", {})}
            for x in e.errors(include_url=False, include_input=False)]


def _document(d: DocumentIn, source: str) -> Document:
    return Document(id=d.id or content_id(d.text), text=d.text, source=source, metadata=d.metadata)


def content_id(text: str) -> str:
    """The id of a document sent without one: a hash of its text, so the same text sent again is
    the same document (unchanged, nothing recomputed), never a duplicate filling top-k slots."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


async def _from_upload(request: Request) -> list[Document]:
    async with request.form(max_files=1, max_fields=8) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ApiError(422, "file: a multipart upload needs the document in a field named `file`")
        name = PurePosixPath((file.filename or "").replace("\\", "/")).name  # never joined to a path
        suffix = PurePosixPath(name).suffix.lower()
        data = await file.read()
        extracted = None if suffix == ".jsonl" else _extract(data, name)
        text = _decode(data, name) if suffix == ".jsonl" else extracted.text
        doc_id, meta_field = form.get("id"), form.get("metadata")
    metadata: dict = {}
    if meta_field not in (None, ""):
        try:
            metadata = rules.loads(str(meta_field))
        except ValueError as e:  # not JSON, nested past the parser, an integer too long
            raise ApiError(422, f"metadata: not valid JSON ({e})") from None
        if problem := rules.metadata_problem(metadata):
            raise ApiError(422, f"metadata: {problem}")
    if suffix == ".jsonl":
        if doc_id not in (None, "") or metadata:
            raise ApiError(422, "id, metadata: not used with a .jsonl upload, whose lines carry their own")
        return _jsonl_documents(text, name)
    d = _validate(("file",), id=doc_id or name or None, text=text, metadata={**metadata, "filename": name})
    doc = _document(d, source=f"upload:{name}")
    doc.pages = extracted.pages
    return [doc]


def _extract(data: bytes, name: str) -> Extracted:
    """The upload's text by the loaders `ragblend index` uses, refused with the reason it would
    give for skipping the file."""
    try:
        return extract_bytes(data, name)
    except Unreadable as e:
        status = 415 if str(e).startswith("unsupported binary format") else 400
        raise ApiError(status, f"file: {name or 'the upload'!r}: {e}") from None


def _decode(data: bytes, name: str) -> str:
    if b"\x00" in data:
        raise ApiError(400, f"file: {name!r} looks binary (it contains NUL bytes); upload UTF-8 text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"file: {name!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def _jsonl_documents(text: str, name: str) -> list[Document]:
    """One document a line, read by the repository's one strict JSONL reader; a line that is not
    a JSON object is the client's bad file (400), a line without a valid `text` a bad field (422)."""
    try:
        rows = jsonl_objects(text, name)
    except JsonlError as e:
        raise ApiError(400, f"file: line {e.line} of {name!r}: {e.reason}") from None
    if not rows:
        raise ApiError(400, f"file: {name!r} holds no documents")
    docs = []
    for lineno, obj in rows:
        doc_id = obj.pop("id", None)
        d = _validate(("file", f"line {lineno}"), id=None if doc_id in (None, "") else str(doc_id),
                      text=obj.pop("text", None), metadata={**obj, "filename": name})
        docs.append(_document(d, source=f"upload:{name}#{lineno}"))
    return docs
