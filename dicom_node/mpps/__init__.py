"""Modality Performed Procedure Step: the node as MPPS SCP (``scp``), what it stores and the
queries completion reads (``store``), and the named statuses (``status``). See docs/mpps.md."""
