"""What every command shares, whatever it computes: exit codes and error paragraphs (`errors`), the
console and the log file (`console`), XLA flags and the compilation cache (`xla_flags`), the device
mesh (`mesh`) and means over it (`collectives`), and the typed-config bridge that validates values at
the boundary (`typed_config`). The bottom layer: it imports nothing else of the project."""
