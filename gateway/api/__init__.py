"""The HTTPS API for software (e-prescription, hospital systems): submit, follow, read, listen.

``server.start_api`` serves it on ``listen.api`` within ``mssgw serve``; the OpenAPI document
(``openapi.document``) says what each endpoint takes and answers.
"""
