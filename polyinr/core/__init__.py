"""The bottom layer: the typed config (params.yaml's schema), storage (a local folder or an
S3 prefix; boto3 lives only here), the ranks of a distributed run, and the error model with
its exit codes. It imports no other polyinr package, so everything may import it."""
