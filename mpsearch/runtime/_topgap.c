/* Top-2 logit gaps of float32 rows in memory: the ratio scorer's raw values in one C call.
 *
 * Right after a model pass every torch op and conversion runs with cold caches; reading the
 * logits where they lie skips the tensor ops (topk) and the Python floats (tolist) of the
 * portable path. The caller (mpsearch/runtime/_scorers.py) passes only contiguous float32 CPU
 * tensors it keeps alive for the call. Results equal the portable path's bit for bit: the two
 * largest values (NaN counts as the largest, as in topk), converted to double, subtracted.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

/* second - first of the two largest of row[0..n); -inf below two values, NaN with a NaN. */
static double row_gap(const float *row, Py_ssize_t n) {
    if (n < 2) {
        return -INFINITY;
    }
    double a = row[0], b = row[1];
    if (isnan(a) || isnan(b)) {
        return NAN;
    }
    if (b > a) {
        double t = a;
        a = b;
        b = t;
    }
    for (Py_ssize_t i = 2; i < n; i++) {
        double v = row[i];
        if (v > b) {
            if (v > a) {
                b = a;
                a = v;
            } else {
                b = v;
            }
        } else if (isnan(v)) {
            return NAN;
        }
    }
    return b - a;
}

static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
                 const float **data, Py_ssize_t *sizes) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    *data = (const float *)(uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) {
        return -1;
    }
    for (Py_ssize_t i = 1; i < want; i++) {
        sizes[i - 1] = PyLong_AsSsize_t(args[i]);
        if (sizes[i - 1] < 0) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "%s(): sizes must be >= 0", name);
            }
            return -1;
        }
    }
    return 0;
}

/* gap(address, n): the gap of the n float32 values at address. */
static PyObject *gap(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *data;
    Py_ssize_t sizes[1];
    if (parse(args, nargs, 2, "gap", &data, sizes) < 0) {
        return NULL;
    }
    return PyFloat_FromDouble(row_gap(data, sizes[0]));
}

/* gaps(address, rows, cols): the gap of each of `rows` rows of `cols` float32 values. */
static PyObject *gaps(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *data;
    Py_ssize_t sizes[2];
    if (parse(args, nargs, 3, "gaps", &data, sizes) < 0) {
        return NULL;
    }
    Py_ssize_t rows = sizes[0], cols = sizes[1];
    PyObject *out = PyList_New(rows);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        PyObject *value = PyFloat_FromDouble(row_gap(data + r * cols, cols));
        if (value == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, r, value);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"gap", (PyCFunction)(void (*)(void))gap, METH_FASTCALL,
     "gap(address, n): second - first of the two largest of n float32 values at address."},
    {"gaps", (PyCFunction)(void (*)(void))gaps, METH_FASTCALL,
     "gaps(address, rows, cols): gap() of each row of a contiguous [rows, cols] float32 block."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_topgap", "Top-2 logit gaps of float32 rows in memory.", -1, methods,
};

PyMODINIT_FUNC PyInit__topgap(void) { return PyModule_Create(&module); }
