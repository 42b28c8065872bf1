// Overlay shim, not part of the upstream series.
// Imitates: torch/csrc/autograd/init.cpp
//
// The series' C++ patch ("[autograd] Let Python number autograd nodes and
// carry thread-local state to another thread") adds three bindings to
// torch._C._autograd:
//
//   _set_sequence_nr(value)      set this thread's autograd sequence number
//   _ThreadLocalState()          capture this thread's at::ThreadLocalState
//   _set_thread_local_state(s)   make a captured state this thread's
//
// An installed wheel cannot receive that C++ edit, so `scripts/overlay
// install` compiles this file against the wheel's headers and appends one
// import line to the wheel's torch/__init__.py that loads it; loading it
// attaches the same three names to torch._C._autograd. Nothing in the series
// imports this module.
//
// Two of the three use only symbols that libtorch_cpu exports
// (at::ThreadLocalState's constructor and setThreadLocalState). The sequence
// number has no exported setter, which is why the series adds
// at::sequence_number::set. Here the counter, a thread_local in an anonymous
// namespace of ATen/SequenceNumber.cpp, is found by its name in
// libtorch_cpu.so's ELF symbol table (wheels ship it unstripped), at its
// offset in this thread's block of the library's thread-local storage.
// Before a thread's first write the address is checked against the exported
// accessors (peek() reads it, get_and_increment() advances it); if the
// symbol is missing or the check fails, _set_sequence_nr raises instead.

#include <Python.h>

#include <ATen/SequenceNumber.h>
#include <ATen/ThreadLocalState.h>

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <string>

namespace {

constexpr const char* kCounterSymbol =
    "_ZN2at15sequence_number12_GLOBAL__N_112sequence_nr_E";

// Where the counter is: the library's handle and the counter's offset in its
// thread-local block. Set once, when the module loads.
void* library = nullptr;
uint64_t counter_offset = 0;
std::string locate_error;

bool find_tls_symbol(const char* path, const char* name, uint64_t* offset) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return false;
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    close(fd);
    return false;
  }
  void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    return false;
  }
  const auto* base = static_cast<const char*>(map);
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(base);
  bool found = false;
  if (std::memcmp(header->e_ident, ELFMAG, SELFMAG) == 0 &&
      header->e_ident[EI_CLASS] == ELFCLASS64) {
    const auto* sections =
        reinterpret_cast<const Elf64_Shdr*>(base + header->e_shoff);
    for (int i = 0; i < header->e_shnum && !found; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB) {
        continue;
      }
      const auto* symbols =
          reinterpret_cast<const Elf64_Sym*>(base + sections[i].sh_offset);
      const char* names = base + sections[sections[i].sh_link].sh_offset;
      const size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
      for (size_t k = 0; k < count; ++k) {
        if (ELF64_ST_TYPE(symbols[k].st_info) == STT_TLS &&
            std::strcmp(names + symbols[k].st_name, name) == 0) {
          *offset = symbols[k].st_value;
          found = true;
          break;
        }
      }
    }
  }
  munmap(map, st.st_size);
  return found;
}

void locate_counter() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&at::sequence_number::peek), &info) == 0 ||
      info.dli_fname == nullptr) {
    locate_error = "cannot tell which library defines at::sequence_number::peek";
    return;
  }
  library = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  if (library == nullptr) {
    locate_error = std::string("cannot open ") + info.dli_fname;
    return;
  }
  if (!find_tls_symbol(info.dli_fname, kCounterSymbol, &counter_offset)) {
    library = nullptr;
    locate_error = std::string(info.dli_fname) +
        " has no symbol table entry for the sequence number (a stripped build)";
  }
}

// This thread's counter, checked against the exported accessors on first use.
uint64_t* this_threads_counter() {
  thread_local uint64_t* counter = nullptr;
  if (counter != nullptr || library == nullptr) {
    return counter;
  }
  const uint64_t before = at::sequence_number::peek(); // allocates the block
  void* block = nullptr;
  if (dlinfo(library, RTLD_DI_TLS_DATA, &block) != 0 || block == nullptr) {
    return nullptr;
  }
  auto* candidate = reinterpret_cast<uint64_t*>(
      static_cast<char*>(block) + counter_offset);
  if (*candidate != before) {
    return nullptr;
  }
  at::sequence_number::get_and_increment();
  if (*candidate != before + 1 || at::sequence_number::peek() != before + 1) {
    return nullptr; // not the counter: never written (the counter stays one up)
  }
  *candidate = before;
  if (at::sequence_number::peek() != before) {
    return nullptr;
  }
  counter = candidate;
  return counter;
}

PyObject* set_sequence_nr(PyObject* /*module*/, PyObject* arg) {
  const unsigned long long value = PyLong_AsUnsignedLongLong(arg);
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    return nullptr;
  }
  uint64_t* counter = this_threads_counter();
  if (counter == nullptr) {
    PyErr_Format(
        PyExc_RuntimeError,
        "torch._C._autograd._set_sequence_nr (overlay shim): cannot locate "
        "this thread's autograd sequence number: %s",
        locate_error.empty() ? "its address failed the check against "
                               "at::sequence_number::peek"
                             : locate_error.c_str());
    return nullptr;
  }
  *counter = value;
  Py_RETURN_NONE;
}

struct StateObject {
  PyObject_HEAD
  at::ThreadLocalState* state;
};

PyObject* state_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (PyTuple_GET_SIZE(args) != 0 || (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "_ThreadLocalState() takes no arguments");
    return nullptr;
  }
  auto* self = reinterpret_cast<StateObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) {
    return nullptr;
  }
  try {
    self->state = new at::ThreadLocalState();
  } catch (const std::exception& e) {
    Py_DECREF(self);
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return reinterpret_cast<PyObject*>(self);
}

void state_dealloc(PyObject* object) {
  auto* self = reinterpret_cast<StateObject*>(object);
  PyTypeObject* type = Py_TYPE(object);
  delete self->state;
  type->tp_free(object);
  Py_DECREF(type);
}

PyType_Slot state_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(state_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(state_dealloc)},
    {Py_tp_doc,
     const_cast<char*>("A thread's at::ThreadLocalState, captured when created.")},
    {0, nullptr},
};

PyType_Spec state_spec = {
    "torch._C._autograd._ThreadLocalState",
    sizeof(StateObject),
    0,
    Py_TPFLAGS_DEFAULT,
    state_slots,
};

PyObject* state_type = nullptr;

PyObject* set_thread_local_state(PyObject* /*module*/, PyObject* arg) {
  if (!PyObject_TypeCheck(arg, reinterpret_cast<PyTypeObject*>(state_type))) {
    PyErr_Format(PyExc_TypeError, "expected a _ThreadLocalState, got %s",
                 Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  try {
    at::ThreadLocalState::setThreadLocalState(
        *reinterpret_cast<StateObject*>(arg)->state);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef bindings[] = {
    {"_set_sequence_nr", set_sequence_nr, METH_O,
     "Set this thread's autograd sequence number (overlay shim)."},
    {"_set_thread_local_state", set_thread_local_state, METH_O,
     "Make a captured _ThreadLocalState this thread's (overlay shim)."},
    {nullptr, nullptr, 0, nullptr},
};

int exec_module(PyObject* module) {
  locate_counter();
  state_type = PyType_FromSpec(&state_spec);
  if (state_type == nullptr) {
    return -1;
  }
  PyObject* autograd = PyImport_ImportModule("torch._C._autograd");
  if (autograd == nullptr) {
    return -1;
  }
  int status = PyObject_SetAttrString(autograd, "_ThreadLocalState", state_type);
  for (PyMethodDef* def = bindings; status == 0 && def->ml_name != nullptr; ++def) {
    PyObject* function = PyCFunction_NewEx(def, nullptr, nullptr);
    status = function == nullptr ? -1 : PyObject_SetAttrString(autograd, def->ml_name, function);
    Py_XDECREF(function);
  }
  Py_DECREF(autograd);
  if (status == 0) {
    status = PyModule_AddObjectRef(module, "_ThreadLocalState", state_type);
  }
  return status;
}

PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, reinterpret_cast<void*>(exec_module)},
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "torch._autograd_thread_state_shim",
    "Overlay shim: torch._C._autograd bindings of the series' C++ patch.",
    0,
    nullptr,
    module_slots,
    nullptr,
    nullptr,
    nullptr,
};

} // namespace

PyMODINIT_FUNC PyInit__autograd_thread_state_shim() {
  return PyModuleDef_Init(&module_def);
}
