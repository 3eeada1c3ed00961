"""The OpenAPI 3.1 document of the API, served at ``/v1/openapi.json``.

One dictionary, written by hand next to the handlers so a reader sees every field the server
checks (``gateway.api.schemas``) and every answer it gives; the tests compare the served routes
with the ones the server registers.
"""

from __future__ import annotations

from typing import Any

_ADDRESS = {"type": "string", "format": "email", "maxLength": 254}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM_REF}}}


_ERRORS = {
    "400": _problem("Malformed JSON or a field missing or of the wrong kind (errors[] names each)"),
    "403": _problem("No client certificate, or one not registered for an active APP/ORG mailbox, revoked, "
                    "expired; or not a mailbox this certificate may act as"),
    "429": _problem("Too many requests for this certificate (Retry-After)"),
    "503": _problem("Directory, database or disk unavailable, or too many open connections from this "
                    "address or in all (too-many-connections, then closed): try again later (Retry-After)"),
}

_RECIPIENT = {
    "type": "object",
    "required": ["address", "accepted", "smtp_code", "enhanced_status", "rule", "reason"],
    "properties": {
        "address": _ADDRESS,
        "accepted": {"type": "boolean"},
        "smtp_code": {"type": "integer", "description": "The reply the SMTP edge gives at RCPT TO"},
        "enhanced_status": {"type": "string", "description": "RFC 3463 enhanced status code"},
        "rule": {"type": "string", "description": "The policy rule that decided"},
        "reason": {"type": "string"},
    },
}


def document(max_message_size: int) -> dict[str, Any]:
    """The OpenAPI document (``max_message_size``: ``limits.max_message_size``)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mssgw API",
            "version": "1",
            "description": "Submit health messages and follow them; read an applicative mailbox. "
                           "Authentication: a TLS client certificate registered for an APP or ORG mailbox "
                           "(mutual TLS); a mailbox acts as itself or a mailbox delegated to it. Errors are "
                           "RFC 9457 problem details carrying the SMTP reply code and RFC 3463 enhanced "
                           "status the SMTP edge gives for the same decision.",
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/messages": {"post": {
                "operationId": "submitMessage",
                "summary": "Submit a message; recipients are decided as at RCPT TO; durable before 202",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                                "description": "A retry with the same key and body returns the first answer "
                                               "and queues nothing; the same key with another body: 422"}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/NewMessage"}}},
                    "description": f"At most about {max_message_size} octets once composed"},
                "responses": {
                    "202": {"description": "Queued for the accepted recipients",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Queued"}}}},
                    "408": _problem("The body came slower than the gateway's floor (api.body_min_rate): send it "
                                    "at once; the connection is closed (451 4.4.2)"),
                    "409": _problem("A request with this Idempotency-Key is still running"),
                    "413": _problem("The request or the composed message is over the size limit (552 5.3.4)"),
                    "415": _problem("The body's Content-Encoding is not gzip, deflate or none (554 5.6.1); "
                                    "Accept-Encoding names the codings taken; the connection is closed"),
                    "422": _problem("Refused by policy: sender, every recipient (recipients[]), content or "
                                    "health document; or an Idempotency-Key reused with another body"),
                    **_ERRORS,
                },
            }},
            "/v1/messages/{id}": {"get": {
                "operationId": "getMessage",
                "summary": "Per-recipient state, protection, attempts, last reply, receipts",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The message", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/MessageState"}}}},
                    "404": _problem("No such message submitted by this mailbox"), **_ERRORS},
            }},
            "/v1/mailboxes/{address}/messages": {"get": {
                "operationId": "listMailbox",
                "summary": "Messages received in the mailbox (INBOX, or ?folder=)",
                "parameters": [
                    {"name": "address", "in": "path", "required": True, "schema": _ADDRESS},
                    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                    {"name": "folder", "in": "query", "schema": {"type": "string", "default": "INBOX"}},
                ],
                "responses": {"200": {"description": "Oldest first", "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"messages": {"type": "array", "items": {
                        "$ref": "#/components/schemas/MailboxEntry"}}}}}}}, **_ERRORS},
            }},
            "/v1/mailboxes/{address}/messages/{id}": {
                "get": {
                    "operationId": "getMailboxMessage",
                    "summary": "Parsed message (headers, verification, attachments, documents) or ?raw=1 for MIME",
                    "parameters": [
                        {"name": "address", "in": "path", "required": True, "schema": _ADDRESS},
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "raw", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
                    ],
                    "responses": {"200": {"description": "The message", "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                        "404": _problem("No such message in this mailbox"), **_ERRORS},
                },
                "delete": {
                    "operationId": "deleteMailboxMessage",
                    "summary": "Remove the message from the mailbox",
                    "parameters": [
                        {"name": "address", "in": "path", "required": True, "schema": _ADDRESS},
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {"204": {"description": "Removed"}, "404": _problem("No such message"), **_ERRORS},
                },
            },
            "/v1/events": {"get": {
                "operationId": "events",
                "summary": "Server-Sent Events: message.state, message.receipt, mailbox.message",
                "parameters": [{"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}}],
                "responses": {"200": {"description": "An event stream (text/event-stream); each data line is JSON",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **_ERRORS},
            }},
            "/v1/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                         "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
        "components": {"schemas": {
            "NewMessage": {
                "type": "object", "additionalProperties": False, "required": ["from", "to"],
                "properties": {
                    "from": _ADDRESS,
                    "to": {"type": "array", "items": _ADDRESS, "minItems": 1},
                    "cc": {"type": "array", "items": _ADDRESS},
                    "subject": {"type": "string", "maxLength": 900},
                    "text": {"type": "string"},
                    "html": {"type": "string"},
                    "receipt": {"type": "boolean", "description": "Ask for an MDN (Disposition-Notification-To)"},
                    "attachments": {"type": "array", "maxItems": 100, "items": {
                        "type": "object", "required": ["filename", "content"],
                        "properties": {"filename": {"type": "string"}, "content_type": {"type": "string"},
                                       "content": {"type": "string", "contentEncoding": "base64",
                                                   "description": "base64 on one line (RFC 4648 4); a "
                                                                  "message/rfc822 one is sent unencoded"}}}},
                    "documents": {"type": "array", "maxItems": 1, "items": {
                        "type": "object", "required": ["pdf", "loinc", "patient"],
                        "description": "Packaged as an IHE XDM zip with a CDA R2 document (level 1 around the "
                                       "PDF when no cda is given), X-MSS-CODECDA and X-MSS-INS",
                        "properties": {
                            "pdf": {"type": "string", "contentEncoding": "base64"},
                            "filename": {"type": "string"},
                            "cda": {"type": "string", "contentEncoding": "base64"},
                            "loinc": {"type": "string", "examples": ["57833-6"]},
                            "author_rpps": {"type": "string", "pattern": "^[0-9]{11}$"},
                            "patient": {"type": "object", "required": ["ins"], "properties": {
                                "ins": {"type": "string", "description": "NIR with its key (15 characters)"},
                                "ins_oid": {"type": "string", "default": "real"},
                                "family": {"type": "string"}, "given": {"type": "string"},
                                "birth_date": {"type": "string", "pattern": "^[0-9]{8}$"},
                                "gender": {"type": "string", "enum": ["F", "M", "U"]}}}}}},
                },
            },
            "Queued": {"type": "object", "required": ["id", "recipients"], "properties": {
                "id": {"type": "string"}, "message_id": {"type": ["string", "null"]}, "size": {"type": "integer"},
                "recipients": {"type": "array", "items": _RECIPIENT}}},
            "MessageState": {"type": "object", "properties": {
                "id": {"type": "string"}, "state": {"type": "string"}, "message_id": {"type": ["string", "null"]},
                "recipients": {"type": "array", "items": {"type": "object", "properties": {
                    "address": _ADDRESS, "state": {"type": "string", "enum": [
                        "queued", "deferred", "delivered", "bounced", "quarantined", "deleted"]},
                    "attempts": {"type": "integer"}, "protection": {"type": ["string", "null"]},
                    "last_reply": {"type": ["string", "null"]}}}},
                "receipts": {"type": "array", "items": {"type": "object"}}}},
            "MailboxEntry": {"type": "object", "properties": {
                "id": {"type": "string"}, "received_at": {"type": "string", "format": "date-time"},
                "size": {"type": "integer"}, "from": {"type": ["string", "null"]},
                "subject": {"type": ["string", "null"]}}},
            "Problem": {"type": "object", "description": "RFC 9457", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "detail": {"type": "string"}, "smtp_code": {"type": "integer"},
                "enhanced_status": {"type": "string"}, "rule": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {
                    "pointer": {"type": "string"}, "detail": {"type": "string"}}}},
                "recipients": {"type": "array", "items": _RECIPIENT}}},
        }},
    }
