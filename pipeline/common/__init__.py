"""What every command shares: the parser and one-line errors (`cli`), MLflow runs and run files (`runs`), the
console, Ray Data input (`data`) and its batches and bad-image ledger (`batches`, `ledger`), the shared latency
table and the model registry. Nothing here imports a command."""
