/* module.c - racer_local._native: the CPython face of ngram.c (NgramIndex and topk_rows) and of
 * output_layer.c (OutputLayer).
 *
 * Hand-written against the CPython C API. It converts arguments, turns RL_E* codes into Python
 * exceptions with the same messages as the pure-Python twin in racer_local/ngram.py, and
 * builds the result objects. It needs no NumPy headers: logits come in through the buffer
 * protocol and the output array is made by calling numpy.empty.
 * Leaves out: pickling, subclass-friendly hooks, and any logic of its own (that is ngram.c).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "ngram.h"
#include "output_layer.h"

#define TOKEN_LIMIT 2147483648LL /* token ids are in [0, 2**31) */

typedef struct {
    PyObject_HEAD
    rl_index *idx;
    int window, min_match;
    int32_t max_nodes;
} NgramIndexObject;

static PyObject *raise_code(int rc) {
    if (rc == RL_ENOMEM) return PyErr_NoMemory();
    if (rc == RL_EINVAL) PyErr_SetString(PyExc_ValueError, "ngram index: argument out of range");
    else if (rc == RL_EFULL) PyErr_SetString(PyExc_RuntimeError, "ngram index: no leaf could be evicted");
    else PyErr_Format(PyExc_RuntimeError, "ngram index: unexpected error %d", rc);
    return NULL;
}

/* A token id from any int-like object; -1 with an exception set when it is not one. */
static int32_t as_token(PyObject *obj) {
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            v = -1;
        } else {
            return -1;
        }
    }
    if (v < 0 || v >= TOKEN_LIMIT) {
        PyErr_Format(PyExc_ValueError, "token ids must be in [0, 2**31), got %R", obj);
        return -1;
    }
    return (int32_t)v;
}

static int NgramIndex_init(NgramIndexObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"window", "max_nodes", "min_match", NULL};
    Py_ssize_t window = 10, max_nodes = 100000, min_match = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nnn:NgramIndex", kwlist, &window, &max_nodes, &min_match))
        return -1;
    const char *msg = rl_check_params(window, max_nodes, min_match);
    if (msg) {
        PyErr_SetString(PyExc_ValueError, msg);
        return -1;
    }
    rl_index *idx = rl_index_new((int)window, (int32_t)max_nodes, (int)min_match);
    if (!idx) {
        PyErr_NoMemory();
        return -1;
    }
    rl_index_free(self->idx);
    self->idx = idx;
    self->window = (int)window;
    self->max_nodes = (int32_t)max_nodes;
    self->min_match = (int)min_match;
    return 0;
}

static void NgramIndex_dealloc(NgramIndexObject *self) {
    rl_index_free(self->idx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_ready(NgramIndexObject *self) {
    if (self->idx) return 0;
    PyErr_SetString(PyExc_RuntimeError, "NgramIndex.__init__ was not called");
    return -1;
}

static PyObject *NgramIndex_extend(NgramIndexObject *self, PyObject *tokens) {
    if (check_ready(self)) return NULL;
    PyObject *seq = PySequence_Fast(tokens, "tokens must be an iterable of ints");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int32_t *buf = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof *buf);
    if (!buf) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        buf[i] = as_token(items[i]); /* all are checked before any is appended */
        if (buf[i] < 0) {
            PyMem_Free(buf);
            Py_DECREF(seq);
            return NULL;
        }
    }
    int rc = rl_index_extend(self->idx, buf, (size_t)n);
    PyMem_Free(buf);
    Py_DECREF(seq);
    if (rc != RL_OK) return raise_code(rc);
    Py_RETURN_NONE;
}

/* [(path, score), ...] for the leaves, each path the tokens from root's child to the leaf. */
static PyObject *build_paths(const rl_draft_node *nodes, const int32_t *leaves, int n_leaves) {
    PyObject *out = PyList_New(n_leaves);
    if (!out) return NULL;
    for (int j = 0; j < n_leaves; j++) {
        int32_t leaf = leaves[j];
        PyObject *path = PyList_New(nodes[leaf].depth);
        if (!path) goto fail;
        for (int32_t i = leaf, d = nodes[leaf].depth; i >= 0; i = nodes[i].parent) {
            PyObject *tok = PyLong_FromLong(nodes[i].token);
            if (!tok) { Py_DECREF(path); goto fail; }
            PyList_SET_ITEM(path, --d, tok);
        }
        PyObject *item = Py_BuildValue("(NL)", path, (long long)nodes[leaf].score);
        if (!item) goto fail;
        PyList_SET_ITEM(out, j, item);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *build_nodes(const rl_draft_node *nodes, int m) {
    PyObject *out = PyList_New(m);
    if (!out) return NULL;
    for (int i = 0; i < m; i++) {
        PyObject *item = Py_BuildValue("(iiL)", (int)nodes[i].token, (int)nodes[i].parent,
                                       (long long)nodes[i].score);
        if (!item) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* retrieve() and retrieve_nodes(): one search, two shapes of result. */
static PyObject *retrieve_as(NgramIndexObject *self, PyObject *args, PyObject *kwds, int as_nodes) {
    static char *kwlist[] = {"root", "budget", NULL};
    PyObject *root_obj;
    Py_ssize_t budget;
    if (check_ready(self)) return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On", kwlist, &root_obj, &budget)) return NULL;
    int32_t root = as_token(root_obj);
    if (root < 0) return NULL;
    if (budget < 0) return PyErr_Format(PyExc_ValueError, "budget must be >= 0, got %zd", budget);

    Py_ssize_t cap = rl_index_node_count(self->idx) - 1; /* nothing can keep more nodes */
    if (budget < cap) cap = budget;
    if (cap == 0) return PyList_New(0);
    rl_draft_node *nodes = PyMem_Malloc((size_t)cap * sizeof *nodes);
    int32_t *leaves = PyMem_Malloc((size_t)cap * sizeof *leaves);
    PyObject *out = NULL;
    if (!nodes || !leaves) {
        PyErr_NoMemory();
    } else {
        int n_leaves = 0;
        int m = rl_index_retrieve(self->idx, root, (int)cap, nodes, leaves, &n_leaves);
        out = m < 0 ? raise_code(m) : as_nodes ? build_nodes(nodes, m) : build_paths(nodes, leaves, n_leaves);
    }
    PyMem_Free(nodes);
    PyMem_Free(leaves);
    return out;
}

static PyObject *NgramIndex_retrieve(NgramIndexObject *self, PyObject *args, PyObject *kwds) {
    return retrieve_as(self, args, kwds, 0);
}

static PyObject *NgramIndex_retrieve_nodes(NgramIndexObject *self, PyObject *args, PyObject *kwds) {
    return retrieve_as(self, args, kwds, 1);
}

static PyObject *NgramIndex_reset(NgramIndexObject *self, PyObject *Py_UNUSED(ignored)) {
    if (check_ready(self)) return NULL;
    rl_index_reset(self->idx);
    Py_RETURN_NONE;
}

static Py_ssize_t NgramIndex_len(NgramIndexObject *self) {
    if (check_ready(self)) return -1;
    return (Py_ssize_t)rl_index_n_tokens(self->idx);
}

static PyObject *NgramIndex_get_node_count(NgramIndexObject *self, void *Py_UNUSED(closure)) {
    if (check_ready(self)) return NULL;
    return PyLong_FromLong(rl_index_node_count(self->idx));
}

static PyObject *NgramIndex_get_window(NgramIndexObject *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->window); }
static PyObject *NgramIndex_get_max_nodes(NgramIndexObject *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->max_nodes); }
static PyObject *NgramIndex_get_min_match(NgramIndexObject *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->min_match); }

static PyObject *NgramIndex_repr(NgramIndexObject *self) {
    if (!self->idx) return PyUnicode_FromString("<NgramIndex (uninitialised)>");
    return PyUnicode_FromFormat("NgramIndex(window=%d, max_nodes=%d, min_match=%d) with %lld tokens, %d nodes",
                                self->window, (int)self->max_nodes, self->min_match,
                                (long long)rl_index_n_tokens(self->idx), (int)rl_index_node_count(self->idx));
}

static PyMethodDef NgramIndex_methods[] = {
    {"extend", (PyCFunction)NgramIndex_extend, METH_O,
     "extend(tokens)\n--\n\nAppend token ids (ints in [0, 2**31)) to the indexed stream."},
    {"retrieve", (PyCFunction)(void (*)(void))NgramIndex_retrieve, METH_VARARGS | METH_KEYWORDS,
     "retrieve(root, budget)\n--\n\n"
     "Draft continuations after the next token `root`: [(tokens, score), ...] ending at the\n"
     "leaves of at most `budget` kept nodes, by score desc then tokens asc."},
    {"retrieve_nodes", (PyCFunction)(void (*)(void))NgramIndex_retrieve_nodes, METH_VARARGS | METH_KEYWORDS,
     "retrieve_nodes(root, budget)\n--\n\n"
     "The same search as retrieve(), as the kept nodes in rank order: [(token, parent, score),\n"
     "...] where parent indexes this list (-1: a child of root). Parents precede children."},
    {"reset", (PyCFunction)NgramIndex_reset, METH_NOARGS, "reset()\n--\n\nForget the stream and every node."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NgramIndex_getset[] = {
    {"node_count", (getter)NgramIndex_get_node_count, NULL, "Live trie nodes, the root included.", NULL},
    {"window", (getter)NgramIndex_get_window, NULL, "Longest n-gram indexed.", NULL},
    {"max_nodes", (getter)NgramIndex_get_max_nodes, NULL, "Node cap, the root included.", NULL},
    {"min_match", (getter)NgramIndex_get_min_match, NULL, "Least border depth (matched tokens + root).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods NgramIndex_as_sequence = {
    .sq_length = (lenfunc)NgramIndex_len,
};

static PyTypeObject NgramIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "racer_local._native.NgramIndex",
    .tp_doc = "NgramIndex(window=10, max_nodes=100000, min_match=2)\n--\n\n"
              "RACER retrieval index over an append-only token stream (spec: native/ngram.h).",
    .tp_basicsize = sizeof(NgramIndexObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NgramIndex_init,
    .tp_dealloc = (destructor)NgramIndex_dealloc,
    .tp_repr = (reprfunc)NgramIndex_repr,
    .tp_methods = NgramIndex_methods,
    .tp_getset = NgramIndex_getset,
    .tp_as_sequence = &NgramIndex_as_sequence,
};

#define LOGITS_TYPE_MSG \
    "logits must be a C-contiguous 2-D float32 array; convert with np.ascontiguousarray(x, dtype=np.float32)"

static PyObject *topk_rows(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"logits", "k", NULL};
    PyObject *logits;
    Py_ssize_t k;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On:topk_rows", kwlist, &logits, &k)) return NULL;

    Py_buffer in;
    if (PyObject_GetBuffer(logits, &in, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear(); /* BufferError or TypeError: say what is wanted instead */
        PyErr_SetString(PyExc_TypeError, LOGITS_TYPE_MSG);
        return NULL;
    }
    PyObject *out = NULL, *numpy = NULL;
    const char *fmt = in.format ? in.format : "B";
    /* '<f' is what numpy reports for float32 that came through ctypes (llama.cpp's logits). */
    const uint16_t one = 1;
    const int little = *(const uint8_t *)&one == 1;
    int is_f32 = strcmp(fmt, "f") == 0 || strcmp(fmt, "=f") == 0 || (little && strcmp(fmt, "<f") == 0);
    if (in.ndim != 2 || in.itemsize != 4 || !is_f32) {
        PyErr_SetString(PyExc_TypeError, LOGITS_TYPE_MSG);
        goto done;
    }
    Py_ssize_t n_rows = in.shape[0], n_cols = in.shape[1];
    if (k < 1 || k > n_cols) {
        PyErr_Format(PyExc_ValueError, "k must be between 1 and the row length %zd, got %zd", n_cols, k);
        goto done;
    }
    numpy = PyImport_ImportModule("numpy");
    if (!numpy) goto done;
    out = PyObject_CallMethod(numpy, "empty", "((nn)s)", n_rows, k, "int32");
    if (!out) goto done;
    Py_buffer ob;
    if (PyObject_GetBuffer(out, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        Py_CLEAR(out);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = rl_topk_rows((const float *)in.buf, (size_t)n_rows, (size_t)n_cols, (int)k, (int32_t *)ob.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ob);
    if (rc != RL_OK) {
        Py_CLEAR(out);
        raise_code(rc);
    }
done:
    Py_XDECREF(numpy);
    PyBuffer_Release(&in);
    return out;
}


/* ----- OutputLayer ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    rl_head *head;
    Py_ssize_t n_vocab, n_embd;
    int max_rows;
} OutputLayerObject;

static int OutputLayer_init(OutputLayerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"weights", "n_vocab", "n_embd", "max_rows", "name_fn", "data_fn", "size_fn", NULL};
    Py_buffer w;
    Py_ssize_t n_vocab, n_embd, max_rows;
    unsigned long long name_fn, data_fn, size_fn;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*nnnKKK:OutputLayer", kwlist, &w, &n_vocab, &n_embd, &max_rows,
                                     &name_fn, &data_fn, &size_fn))
        return -1;
    int rc = -1;
    if (!rl_head_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512 VNNI, which OutputLayer needs");
    } else if (n_vocab < 1 || n_embd < 32 || n_embd % 32 || max_rows < 1 || max_rows > 4096) {
        PyErr_Format(PyExc_ValueError, "OutputLayer needs n_vocab >= 1, n_embd a multiple of 32 and max_rows in "
                     "1..4096, got %zd, %zd, %zd", n_vocab, n_embd, max_rows);
    } else if (w.len != n_vocab * (n_embd / 32) * 34) {
        PyErr_Format(PyExc_ValueError, "weights must be %zd bytes of q8_0 (%zd x %zd), got %zd",
                     n_vocab * (n_embd / 32) * 34, n_vocab, n_embd, w.len);
    } else if (!name_fn || !data_fn || !size_fn) {
        PyErr_SetString(PyExc_ValueError, "name_fn, data_fn and size_fn must be ggml function addresses");
    } else {
        rl_head *head = NULL;
        int code;
        Py_BEGIN_ALLOW_THREADS
        code = rl_head_new(w.buf, n_vocab, n_embd, (int)max_rows, (rl_tensor_name_fn)(uintptr_t)name_fn,
                           (rl_tensor_data_fn)(uintptr_t)data_fn, (rl_tensor_size_fn)(uintptr_t)size_fn, &head);
        Py_END_ALLOW_THREADS
        if (code != RL_OK) {
            raise_code(code);
        } else {
            rl_head_free(self->head);
            self->head = head, self->n_vocab = n_vocab, self->n_embd = n_embd, self->max_rows = (int)max_rows;
            rc = 0;
        }
    }
    PyBuffer_Release(&w);
    return rc;
}

static void OutputLayer_dealloc(OutputLayerObject *self) {
    rl_head_free(self->head);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int head_ready(OutputLayerObject *self) {
    if (self->head) return 0;
    PyErr_SetString(PyExc_RuntimeError, "OutputLayer.__init__ was not called");
    return -1;
}

static PyObject *OutputLayer_arm(OutputLayerObject *self, PyObject *on) {
    if (head_ready(self)) return NULL;
    int armed = PyObject_IsTrue(on);
    if (armed < 0) return NULL;
    rl_head_arm(self->head, armed);
    Py_RETURN_NONE;
}

/* Fills `out` (writable, C-contiguous float32, rows x n_vocab) from x or the captured rows; with
 * `ids_obj` (writable int32, rows x k), each row's best k instead: ids there, logits in `out`. */
static PyObject *head_fill(OutputLayerObject *self, PyObject *x_obj, PyObject *out_obj, PyObject *ids_obj,
                           Py_ssize_t k, Py_ssize_t n_threads) {
    Py_buffer out, ids = {0}, x = {0};
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    PyObject *result = NULL;
    int rows = x_obj ? 0 : rl_head_captured(self->head);
    if (ids_obj && PyObject_GetBuffer(ids_obj, &ids, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (x_obj && PyObject_GetBuffer(x_obj, &x, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (x_obj) {
        if (x.len % (self->n_embd * 4)) {
            PyErr_Format(PyExc_ValueError, "x must hold rows of %zd float32", self->n_embd);
            goto done;
        }
        rows = (int)(x.len / (self->n_embd * 4));
    }
    if (rows < 1 || rows > self->max_rows) {
        PyErr_Format(PyExc_ValueError, rows < 0 ? "the decode's hidden states did not fit (more than %d rows)"
                     : "OutputLayer has %d rows at most and none captured or given", self->max_rows);
        goto done;
    }
    if (ids_obj && (k < 1 || k > RL_HEAD_MAX_K || k > self->n_vocab)) {
        PyErr_Format(PyExc_ValueError, "k must be in 1..%d (and at most n_vocab), got %zd", RL_HEAD_MAX_K, k);
        goto done;
    }
    if (ids_obj && (out.len < (Py_ssize_t)rows * k * 4 || ids.len < (Py_ssize_t)rows * k * 4)) {
        PyErr_Format(PyExc_ValueError, "ids and logits must hold %zd values each (rows x k)", (Py_ssize_t)rows * k);
        goto done;
    }
    if (!ids_obj && out.len < (Py_ssize_t)rows * self->n_vocab * 4) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, %zd needed", out.len, (Py_ssize_t)rows * self->n_vocab * 4);
        goto done;
    }
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %zd", n_threads);
        goto done;
    }
    int rc;
    const float *hidden = x_obj ? x.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (ids_obj)
        rc = hidden ? rl_head_top_k_of(self->head, hidden, rows, (int)n_threads, (int)k, ids.buf, out.buf)
                    : rl_head_top_k(self->head, (int)n_threads, (int)k, ids.buf, out.buf);
    else
        rc = hidden ? rl_head_logits_of(self->head, hidden, rows, (int)n_threads, out.buf)
                    : rl_head_logits(self->head, (int)n_threads, out.buf);
    Py_END_ALLOW_THREADS
    if (rc == RL_EINVAL && ids_obj)
        PyErr_Format(PyExc_ValueError, "fewer than %zd of a row's logits are above -inf (NaN or -inf logits)", k);
    else
        result = rc == RL_OK ? PyLong_FromLong(rows) : raise_code(rc);
done:
    if (x_obj && x.obj) PyBuffer_Release(&x);
    if (ids_obj && ids.obj) PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *OutputLayer_logits(OutputLayerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"out", "n_threads", NULL};
    PyObject *out;
    Py_ssize_t n_threads;
    if (head_ready(self) || !PyArg_ParseTupleAndKeywords(args, kwds, "On:logits", kwlist, &out, &n_threads))
        return NULL;
    return head_fill(self, NULL, out, NULL, 0, n_threads);
}

static PyObject *OutputLayer_logits_of(OutputLayerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "out", "n_threads", NULL};
    PyObject *x, *out;
    Py_ssize_t n_threads;
    if (head_ready(self) || !PyArg_ParseTupleAndKeywords(args, kwds, "OOn:logits_of", kwlist, &x, &out, &n_threads))
        return NULL;
    return head_fill(self, x, out, NULL, 0, n_threads);
}

static PyObject *OutputLayer_top_k(OutputLayerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"k", "ids", "logits", "n_threads", NULL};
    PyObject *ids, *logits;
    Py_ssize_t k, n_threads;
    if (head_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "nOOn:top_k", kwlist, &k, &ids, &logits, &n_threads))
        return NULL;
    return head_fill(self, NULL, logits, ids, k, n_threads);
}

static PyObject *OutputLayer_top_k_of(OutputLayerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "k", "ids", "logits", "n_threads", NULL};
    PyObject *x, *ids, *logits;
    Py_ssize_t k, n_threads;
    if (head_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OnOOn:top_k_of", kwlist, &x, &k, &ids, &logits, &n_threads))
        return NULL;
    return head_fill(self, x, logits, ids, k, n_threads);
}

static PyObject *OutputLayer_get_captured(OutputLayerObject *self, void *Py_UNUSED(c)) {
    if (head_ready(self)) return NULL;
    return PyLong_FromLong(rl_head_captured(self->head));
}

static PyObject *OutputLayer_get_callback(OutputLayerObject *Py_UNUSED(self), void *Py_UNUSED(c)) {
    return PyLong_FromVoidPtr((void *)(uintptr_t)&rl_head_eval_callback);
}

static PyObject *OutputLayer_get_user_data(OutputLayerObject *self, void *Py_UNUSED(c)) {
    if (head_ready(self)) return NULL;
    return PyLong_FromVoidPtr(self->head);
}

static PyMethodDef OutputLayer_methods[] = {
    {"arm", (PyCFunction)OutputLayer_arm, METH_O,
     "arm(on)\n--\n\nWhile armed, the eval callback captures the hidden states and stops the graph."},
    {"logits", (PyCFunction)(void (*)(void))OutputLayer_logits, METH_VARARGS | METH_KEYWORDS,
     "logits(out, n_threads)\n--\n\nThe captured rows' logits into out (rows x n_vocab float32); returns rows."},
    {"logits_of", (PyCFunction)(void (*)(void))OutputLayer_logits_of, METH_VARARGS | METH_KEYWORDS,
     "logits_of(x, out, n_threads)\n--\n\nThe logits of hidden states x (rows x n_embd float32) into out."},
    {"top_k", (PyCFunction)(void (*)(void))OutputLayer_top_k, METH_VARARGS | METH_KEYWORDS,
     "top_k(k, ids, logits, n_threads)\n--\n\nEach captured row's best k tokens into ids (rows x k int32) and\n"
     "their logits into logits (rows x k float32), best first, ties to the smaller id; returns rows."},
    {"top_k_of", (PyCFunction)(void (*)(void))OutputLayer_top_k_of, METH_VARARGS | METH_KEYWORDS,
     "top_k_of(x, k, ids, logits, n_threads)\n--\n\nThe same for hidden states x (rows x n_embd float32)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef OutputLayer_getset[] = {
    {"captured", (getter)OutputLayer_get_captured, NULL, "Rows captured by the last armed decode (-1: too many).", NULL},
    {"callback", (getter)OutputLayer_get_callback, NULL, "Address of the ggml eval callback (cb_eval).", NULL},
    {"user_data", (getter)OutputLayer_get_user_data, NULL, "Its user data (cb_eval_user_data).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject OutputLayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "racer_local._native.OutputLayer",
    .tp_doc = "OutputLayer(weights, n_vocab, n_embd, max_rows, name_fn, data_fn, size_fn)\n--\n\n"
              "A q8_0 output layer for batches of rows on the CPU (spec: native/output_layer.h).",
    .tp_basicsize = sizeof(OutputLayerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)OutputLayer_init,
    .tp_dealloc = (destructor)OutputLayer_dealloc,
    .tp_methods = OutputLayer_methods,
    .tp_getset = OutputLayer_getset,
};

static PyObject *output_layer_supported(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(rl_head_supported());
}

static PyMethodDef module_methods[] = {
    {"topk_rows", (PyCFunction)(void (*)(void))topk_rows, METH_VARARGS | METH_KEYWORDS,
     "topk_rows(logits, k)\n--\n\n"
     "Top-k column ids of each row of a C-contiguous float32 (n, vocab) array, as int32 (n, k),\n"
     "by value desc then id asc, NaN as -inf; 1 <= k <= vocab. Releases the GIL."},
    {"output_layer_supported", output_layer_supported, METH_NOARGS,
     "output_layer_supported()\n--\n\nWhether this CPU runs OutputLayer's kernel (AVX-512 VNNI)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "racer_local._native",
    .m_doc = "C implementation of racer_local.ngram (spec: native/ngram.h).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&NgramIndexType) < 0 || PyType_Ready(&OutputLayerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    Py_INCREF(&NgramIndexType);
    if (PyModule_AddObject(m, "NgramIndex", (PyObject *)&NgramIndexType) < 0) {
        Py_DECREF(&NgramIndexType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&OutputLayerType);
    if (PyModule_AddObject(m, "OutputLayer", (PyObject *)&OutputLayerType) < 0) {
        Py_DECREF(&OutputLayerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
