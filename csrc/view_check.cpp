// armijo_fused._C.ViewCheck: FlatBuffer.sync's per-step checks of every tensor in one call.
//
// sync() runs before the first pass of every step (host time a GPU waits for). In Python the
// checks cost ~0.5 us per tensor (each .data_ptr(), .shape, .grad and state[p] is an attribute
// call, state[p] a Python-level Tensor.__hash__): ~70-100 us at GPT-2's 148 tensors. Here: one
// call, ~7 us. It only looks; whatever is not as expected is left to the Python path
// (storage/flat.py), which remains the reference and handles every repair.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace armijo_fused {

// hidden: its py::list fields are (pybind11 gives its types hidden visibility)
class __attribute__((visibility("hidden"))) ViewCheck {
 public:
  // params[i]: the tensor; pviews[i] / gviews[i]: its views in the flat θ / g buffers;
  // names[j] / sviews[j][i]: state entry j of tensor i and the view it must be.
  ViewCheck(py::list params, py::list pviews, py::list gviews, py::list names, py::list sviews)
      : params_(params), gviews_(gviews), names_(names), sviews_(sviews) {
    const auto n = py::len(params);
    for (size_t i = 0; i < n; ++i) {
      pv_.push_back(THPVariable_Unpack(pviews[i].ptr()));
      gv_.push_back(THPVariable_Unpack(gviews[i].ptr()));
      index_[params[i].ptr()] = static_cast<Py_ssize_t>(i);  // params_ keeps them alive
    }
  }

  // (moved, foreign_grad, state_ok): the first tensor whose storage address or shape is not its
  // view's (-1: none; the caller then rebuilds through the Python loop); the first tensor whose
  // .grad is not its gradient view (-1: none); whether every tensor's state dict holds its views
  // (False for anything else: a missing dict or entry, a replaced one, state not a dict).
  std::tuple<int64_t, int64_t, bool> check(py::handle state) const {
    PyObject* plist = params_.ptr();
    const Py_ssize_t n = PyList_GET_SIZE(plist);
    int64_t foreign = -1;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(plist, i));
      if (p.data_ptr() != pv_[i].data_ptr() || p.sizes() != pv_[i].sizes()) return {i, -1, false};
      if (foreign < 0) {
        const at::Tensor& g = p.grad();
        if (!g.defined() || g.unsafeGetTensorImpl() != gv_[i].unsafeGetTensorImpl()) foreign = i;
      }
    }
    if (!PyDict_Check(state.ptr())) return {-1, foreign, false};
    // walk the state dict (no hashing of tensor keys: Tensor.__hash__ is Python code)
    Py_ssize_t pos = 0, found = 0;
    PyObject *key, *value;
    const Py_ssize_t nnames = PyList_GET_SIZE(names_.ptr());
    while (PyDict_Next(state.ptr(), &pos, &key, &value)) {
      auto it = index_.find(key);
      if (it == index_.end()) continue;  // another buffer's tensor
      if (!PyDict_Check(value)) return {-1, foreign, false};
      for (Py_ssize_t j = 0; j < nnames; ++j) {
        PyObject* got = PyDict_GetItemWithError(value, PyList_GET_ITEM(names_.ptr(), j));
        if (got == nullptr && PyErr_Occurred()) throw py::error_already_set();
        if (got != PyList_GET_ITEM(PyList_GET_ITEM(sviews_.ptr(), j), it->second))
          return {-1, foreign, false};
      }
      ++found;
    }
    return {-1, foreign, found == n};
  }

 private:
  py::list params_, gviews_, names_, sviews_;
  std::vector<at::Tensor> pv_, gv_;
  std::unordered_map<PyObject*, Py_ssize_t> index_;
};

void bind_view_check(py::module& m) {
  py::class_<ViewCheck>(m, "ViewCheck",
                        "FlatBuffer.sync's checks in one call (storage/flat.py is the reference)")
      .def(py::init<py::list, py::list, py::list, py::list, py::list>())
      .def("check", &ViewCheck::check, py::arg("state"));
}

}  // namespace armijo_fused
