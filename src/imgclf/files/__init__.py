"""Files every stage reads or writes: atomic writes and JSON, folder swap and recovery, digests, every path and
file name (with the project root), the prepared-array reader and the model file. Imports errors and process only."""
