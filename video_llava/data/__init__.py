"""Data the jobs read and write: LLaVA-style records, storage locations (S3 or local), synthetic clips and QA."""
