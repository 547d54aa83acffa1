"""SGLang external model package (``SGLANG_EXTERNAL_MODEL_PACKAGE``) used by the sglang backend.

SGLang imports every module in this package inside its scheduler processes and registers each
module's ``EntryClass``, replacing its built-in classes of the same name. Only SGLang imports it;
specforge itself never does (it imports sglang).
"""
