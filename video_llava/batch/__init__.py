"""The batch stage: captioning every video under an S3 prefix or a directory with Ray Data, exactly once."""
