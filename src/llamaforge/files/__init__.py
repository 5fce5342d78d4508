"""File safety, the shared base of every stage: outputs appear whole or not at all and never
replace what a user has (atomic, guard), inputs are read with one-line errors (reading), each
metadata file once per process and large files hashed once across runs (hashing), and the
SHA256SUMS files and their verification (checksums).

    atomic     atomic folders and files, free-space checks, stale temporaries
    guard      guard_output and the ownership test of each output kind
    reading    required files and folders, UTF-8 text, JSON objects
    hashing    sha256 (remembered by file identity), metadata_bytes, copy_file
    checksums  SHA256SUMS, <file>.sha256, verify reports
"""
