// armijo_fused._C.ViewCheck: FlatBuffer.sync's per-step checks of every tensor in one call; and
// trainable_key, the store's per-step key of which tensors train (see below).
//
// sync() runs before the first pass of every step (host time a GPU waits for). In Python the
// checks cost ~0.5 us per tensor (each .data_ptr(), .shape, .grad and state[p] is an attribute
// call, state[p] a Python-level Tensor.__hash__): ~70-100 us at GPT-2's 148 tensors. Here: one
// call, ~7 us. It only looks; whatever is not as expected is left to the Python path
// (storage/flat.py), which remains the reference and handles every repair.
//
// It holds no reference to the parameters (they are passed to each check): a parameter that
// refers back to the optimizer (torch's _apply_optimizer_in_backward does) would otherwise make a
// cycle the garbage collector cannot see through this object, and nothing would be freed.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace armijo_fused {

namespace {
void require_tensors(py::handle list, Py_ssize_t n, const char* what) {
  if (!PyList_Check(list.ptr()) || PyList_GET_SIZE(list.ptr()) != n)
    throw std::invalid_argument(std::string("ViewCheck: ") + what + " must be a list of " +
                                std::to_string(n) + " tensors");
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!THPVariable_Check(PyList_GET_ITEM(list.ptr(), i)))
      throw std::invalid_argument(std::string("ViewCheck: ") + what + " must hold tensors only");
}
}  // namespace

// hidden visibility, as pybind11 gives its own types: the py::list fields would warn otherwise
class __attribute__((visibility("hidden"))) ViewCheck {
 public:
  // params[i]: the tensor (not kept: only its identity); pviews[i] / gviews[i]: its views in the
  // flat θ / g buffers; gslots[i]: another view of its place in the g buffer, never handed out
  // (``.data =`` on gviews[i] moves that object's data, not this one's); names[j] / sviews[j][i]:
  // state entry j of tensor i and the view it must be.
  ViewCheck(py::list params, py::list pviews, py::list gviews, py::list gslots, py::list names,
            py::list sviews)
      : names_(names), sviews_(sviews) {
    const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
    require_tensors(params, n, "params");
    require_tensors(pviews, n, "pviews");
    require_tensors(gviews, n, "gviews");
    require_tensors(gslots, n, "gslots");
    const Py_ssize_t nnames = PyList_GET_SIZE(names.ptr());
    if (PyList_GET_SIZE(sviews.ptr()) != nnames)
      throw std::invalid_argument("ViewCheck: sviews must hold one list per state name");
    for (Py_ssize_t j = 0; j < nnames; ++j) {
      if (!PyUnicode_Check(PyList_GET_ITEM(names.ptr(), j)))
        throw std::invalid_argument("ViewCheck: names must be strings");
      require_tensors(PyList_GET_ITEM(sviews.ptr(), j), n,
                      ("sviews[" + std::to_string(j) + "]").c_str());
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      pv_.push_back(THPVariable_Unpack(pviews[i].ptr()));
      gv_.push_back(THPVariable_Unpack(gviews[i].ptr()).unsafeGetTensorImpl());
      gs_.push_back(THPVariable_Unpack(gslots[i].ptr()));
      ids_.push_back(params[i].ptr());
      index_[params[i].ptr()] = i;
    }
  }

  // (moved, foreign_grad, state_ok): the first tensor whose storage address, sizes or strides are
  // not its view's (-1: none; the caller then rebuilds through the Python loop); the first tensor
  // whose .grad is not its gradient view, or whose view no longer points at its slot (-1: none);
  // whether every tensor's state dict holds its views (False for anything else: a missing dict
  // or entry, a replaced one, state not a dict, None).
  // ``params``: the same tensors, in the same order, as at construction.
  std::tuple<int64_t, int64_t, bool> check(py::list params, py::handle state) const {
    PyObject* plist = params.ptr();
    const Py_ssize_t n = static_cast<Py_ssize_t>(ids_.size());
    if (PyList_GET_SIZE(plist) != n)
      throw std::invalid_argument("ViewCheck.check: not the tensors it was built for");
    int64_t foreign = -1;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyList_GET_ITEM(plist, i);
      if (obj != ids_[i])
        throw std::invalid_argument("ViewCheck.check: not the tensors it was built for");
      const at::Tensor& p = THPVariable_Unpack(obj);
      if (p.data_ptr() != pv_[i].data_ptr() || p.sizes() != pv_[i].sizes() ||
          p.strides() != pv_[i].strides())
        return {i, -1, false};
      if (foreign < 0) {
        const at::Tensor& g = p.grad();
        if (!g.defined() || g.unsafeGetTensorImpl() != gv_[i] ||
            g.data_ptr() != gs_[i].data_ptr())
          foreign = i;
      }
    }
    if (!PyDict_Check(state.ptr())) return {-1, foreign, false};
    if (PyDict_GET_SIZE(state.ptr()) > kWalkRatio * n) {
      // most of the state is other buffers' (many param groups): look up this buffer's tensors
      // rather than walk it all, which made every step quadratic in the groups (84 ms per
      // step at 4,000). Each lookup runs Tensor.__hash__ (Python code, ~50 ns); a reference it
      // returns is borrowed and used before the next lookup.
      for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* value = PyDict_GetItemWithError(state.ptr(), ids_[i]);
        if (value == nullptr) {
          if (PyErr_Occurred()) throw py::error_already_set();
          return {-1, foreign, false};
        }
        if (!holds_views(value, i)) return {-1, foreign, false};
      }
      return {-1, foreign, true};
    }
    // walk the state dict (no hashing of tensor keys: Tensor.__hash__ is Python code, ~10x a
    // step of the walk); every reference below is borrowed and used before any Python code runs
    Py_ssize_t pos = 0, found = 0;
    PyObject *key, *value;
    while (PyDict_Next(state.ptr(), &pos, &key, &value)) {
      auto it = index_.find(key);
      if (it == index_.end()) continue;  // another buffer's tensor
      if (!holds_views(value, it->second)) return {-1, foreign, false};
      ++found;
    }
    return {-1, foreign, found == n};
  }

 private:
  // the state dict is walked while it is at most this many times the buffer's tensor count
  static constexpr Py_ssize_t kWalkRatio = 8;

  // Does ``value`` (the state dict of tensor i) hold tensor i's views under every state name?
  bool holds_views(PyObject* value, Py_ssize_t i) const {
    if (!PyDict_Check(value)) return false;
    const Py_ssize_t nnames = PyList_GET_SIZE(names_.ptr());
    for (Py_ssize_t j = 0; j < nnames; ++j) {
      PyObject* got = PyDict_GetItemWithError(value, PyList_GET_ITEM(names_.ptr(), j));
      if (got == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (got != PyList_GET_ITEM(PyList_GET_ITEM(sviews_.ptr(), j), i)) return false;
    }
    return true;
  }

  py::list names_, sviews_;
  std::vector<at::Tensor> pv_, gs_;
  // the gradient views by identity only, never dereferenced: a reference of ours would stop
  // torch.utils.swap_tensors (model.to() with swap_module_params_on_conversion) from swapping
  // them. A view swapped or freed no longer matches: its slot's address settles it either way
  std::vector<const c10::TensorImpl*> gv_;
  std::vector<PyObject*> ids_;  // identities only: the caller keeps the tensors alive
  std::unordered_map<PyObject*, Py_ssize_t> index_;
};

// StoreMixin._trainable_key (optimizers/store.py, the reference) in one call: per group, a
// tuple (number of tensors, then each tensor's id() if it requires grad, else 0). It runs before
// every step's first pass; in Python each .requires_grad of a Parameter is ~70 ns, ~13 us at
// GPT-2's 148 tensors. ``groups``: each param group's "params" (any sequence).
py::tuple trainable_key(py::list groups) {
  const Py_ssize_t ngroups = PyList_GET_SIZE(groups.ptr());
  py::tuple out(ngroups);
  for (Py_ssize_t gi = 0; gi < ngroups; ++gi) {
    PyObject* fast = PySequence_Fast(PyList_GET_ITEM(groups.ptr(), gi),
                                     "trainable_key: a group's params must be a sequence");
    if (fast == nullptr) throw py::error_already_set();
    py::object hold = py::reinterpret_steal<py::object>(fast);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    py::tuple key(n + 1);
    key[0] = py::int_(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* p = PySequence_Fast_GET_ITEM(fast, i);
      bool trains;
      if (THPVariable_Check(p)) {
        trains = THPVariable_Unpack(p).requires_grad();
      } else {  // (not a tensor: whatever its attribute says, as the Python twin reads it)
        auto rg =
            py::reinterpret_steal<py::object>(PyObject_GetAttrString(p, "requires_grad"));
        if (!rg) throw py::error_already_set();
        const int truth = PyObject_IsTrue(rg.ptr());
        if (truth < 0) throw py::error_already_set();
        trains = truth != 0;
      }
      if (!trains) {
        key[i + 1] = py::int_(0);
        continue;
      }
      PyObject* id = PyLong_FromVoidPtr(p);  // id(p)
      if (id == nullptr) throw py::error_already_set();
      key[i + 1] = py::reinterpret_steal<py::object>(id);
    }
    out[gi] = std::move(key);
  }
  return out;
}

void bind_view_check(py::module& m) {
  m.def("trainable_key", &trainable_key, py::arg("groups"),
        "StoreMixin._trainable_key in one call (optimizers/store.py is the reference)");
  py::class_<ViewCheck>(m, "ViewCheck",
                        "FlatBuffer.sync's checks in one call (storage/flat.py is the reference)")
      .def(py::init<py::list, py::list, py::list, py::list, py::list, py::list>())
      .def("check", &ViewCheck::check, py::arg("params"), py::arg("state"));
}

}  // namespace armijo_fused
