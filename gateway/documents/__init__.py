"""Health documents in messages: IHE XDM packages, CDA R2 headers, the INS and LOINC document types.

Pure functions over bytes (no I/O, no logging): ``scan.inspect_message`` finds and checks the
packages of a message, ``compose.compose`` writes one, ``ins`` checks a patient identifier.
"""
