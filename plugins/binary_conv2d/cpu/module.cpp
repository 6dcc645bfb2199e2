// CPython binding: tod_deploy.ops._binary_conv_cpu.
//
// Plain C API and the buffer protocol (no NumPy headers, no pybind11), so the extension builds
// with nothing but setuptools and a C++17 compiler. The Python wrapper
// (tod_deploy/ops/binary_conv_cpu.py) validates and allocates; this layer only checks that
// every buffer is C-contiguous and exactly as large as the geometry says.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string>

#include "binary_conv2d_cpu.h"

namespace {

using tod::bconv::Geometry;
using tod::bconv::Isa;
using tod::bconv::Problem;

// A Py_buffer released on scope exit.
struct Buffer {
  Py_buffer view{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
  bool get(PyObject* obj, bool writable, Py_ssize_t itemsize, Py_ssize_t items, const char* name) {
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view, flags) != 0) return false;
    held = true;
    if (view.itemsize != itemsize || view.len != itemsize * items) {
      PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes of items of %zd", name, items,
                   itemsize, view.len, view.itemsize);
      return false;
    }
    return true;
  }
};

PyObject* py_conv2d(PyObject*, PyObject* args) {
  PyObject *x, *w, *alpha, *bias, *thr, *out, *sums, *geom, *residual, *slope;
  const char* isa_name;
  int threads, activation;
  if (!PyArg_ParseTuple(args, "OOOOOOOOsiOOi:conv2d", &x, &w, &alpha, &bias, &thr, &out, &sums, &geom, &isa_name,
                        &threads, &residual, &slope, &activation)) {
    return nullptr;
  }
  Geometry g{};
  int64_t* fields[] = {&g.n,  &g.c,  &g.h,  &g.w,  &g.cout, &g.kh, &g.kw,    &g.sh,        &g.sw,
                       &g.dh, &g.dw, &g.pt, &g.pl, &g.pb,   &g.pr, &g.group, &g.zero_sign, &g.pad_value};
  constexpr Py_ssize_t kFields = sizeof(fields) / sizeof(fields[0]);
  if (!PyTuple_Check(geom) || PyTuple_GET_SIZE(geom) != kFields) {
    PyErr_Format(PyExc_ValueError, "geometry must be a tuple of %zd ints", kFields);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < kFields; ++i) {
    *fields[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(geom, i));
    if (PyErr_Occurred()) return nullptr;
  }
  Isa isa;
  if (!tod::bconv::parse_isa(isa_name, &isa)) {
    PyErr_Format(PyExc_ValueError, "unknown ISA path %s (scalar, avx2, avx512, amx)", isa_name);
    return nullptr;
  }
  Geometry d = g;
  tod::bconv::derive(d);
  if (d.group < 1 || d.ho < 1 || d.wo < 1 || d.c % d.group || d.cout % d.group) {
    PyErr_SetString(PyExc_ValueError, "inconsistent geometry");
    return nullptr;
  }
  const Py_ssize_t n_out = d.n * d.cout * d.ho * d.wo;
  Buffer bx, bw, ba, bb, bt, bo, bs, br, bp;
  if (!bx.get(x, false, 4, d.n * d.c * d.h * d.w, "X") || !bw.get(w, false, 1, d.cout * d.taps * d.words * 8, "W_packed") ||
      !ba.get(alpha, false, 4, d.cout, "alpha") || !bt.get(thr, false, 4, d.c, "threshold") ||
      !bo.get(out, true, 4, n_out, "out")) {
    return nullptr;
  }
  if (bias != Py_None && !bb.get(bias, false, 4, d.cout, "bias")) return nullptr;
  if (sums != Py_None && !bs.get(sums, true, 4, n_out, "sums")) return nullptr;
  if (residual != Py_None && !br.get(residual, false, 4, n_out, "residual")) return nullptr;
  if (slope != Py_None && !bp.get(slope, false, 4, d.cout, "slope")) return nullptr;

  Problem p;
  p.g = g;
  p.x = static_cast<const float*>(bx.view.buf);
  p.w_packed = static_cast<const uint8_t*>(bw.view.buf);
  p.alpha = static_cast<const float*>(ba.view.buf);
  p.bias = bias != Py_None ? static_cast<const float*>(bb.view.buf) : nullptr;
  p.threshold = static_cast<const float*>(bt.view.buf);
  p.out = static_cast<float*>(bo.view.buf);
  p.sums = sums != Py_None ? static_cast<int32_t*>(bs.view.buf) : nullptr;
  p.residual = residual != Py_None ? static_cast<const float*>(br.view.buf) : nullptr;
  p.slope = slope != Py_None ? static_cast<const float*>(bp.view.buf) : nullptr;
  p.activation = activation;
  std::string error;
  Py_BEGIN_ALLOW_THREADS;
  try {
    error = tod::bconv::run(p, isa, threads);
  } catch (const std::exception& e) {
    error = e.what();
  }
  Py_END_ALLOW_THREADS;
  if (!error.empty()) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_supported_isas(PyObject*, PyObject*) {
  const auto isas = tod::bconv::supported_isas();
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(isas.size()));
  if (!names) return nullptr;
  for (size_t i = 0; i < isas.size(); ++i) {
    PyTuple_SET_ITEM(names, static_cast<Py_ssize_t>(i), PyUnicode_FromString(tod::bconv::isa_name(isas[i])));
  }
  return names;
}

PyMethodDef kMethods[] = {
    {"conv2d", py_conv2d, METH_VARARGS,
     "conv2d(x, w_packed, alpha, bias|None, threshold[c], out, sums|None, geometry, isa, threads,\n"
     "       residual|None, slope|None, activation)   activation: 0 none, 1 relu, 2 prelu\n"
     "geometry = (n, c, h, w, cout, kh, kw, sh, sw, dh, dw, pad_top, pad_left, pad_bottom, pad_right, group,\n"
     "            zero_sign, pad_value)"},
    {"supported_isas", py_supported_isas, METH_NOARGS, "ISA paths this build and CPU can run, best first."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_binary_conv_cpu", "tod::BinaryConv2d CPU kernel.", -1, kMethods, nullptr, nullptr, nullptr,
    nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__binary_conv_cpu(void) { return PyModule_Create(&kModule); }
