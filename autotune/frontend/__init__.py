"""Getting a model into TVM Relax: the torch / ExportedProgram / ONNX importers, our fixes to
TVM's converters, model sources (a zoo name, a bench workload or a file, with example inputs and
the torch reference), and structured pruning of the torch model before import.

May import: support, models.
"""
